"""The ``tpu`` target: a parameterized model of a TPU-style matrix-unit accelerator (a systolic array).

A model of such hardware for design-space exploration, not a driver: matmul / gemm / conv regions are
partitioned out of the Relax program (``partition``), turned into tiled instruction streams (``isa``) and
executed, bit-exact for int8, by a cycle-counting simulator (``sim``) on the host CPU.
"""
