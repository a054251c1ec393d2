"""Sparse storage of a pruned weight: kept values, a packed 1-bit mask, and an in-graph decode.

A weight ``w`` (float32, any shape) is stored as

* ``values``: float32 ``[nnz + 1]``: ``0.0`` then the kept weights in row-major order of ``w`` as stored
  (a weight is *kept* unless it is bit for bit ``+0.0``, so a kept ``-0.0`` survives);
* ``mask``: uint8 ``[ceil(size / 8)]``: 1 bit per weight, ``np.packbits(..., bitorder="little")`` (weight
  ``i`` is bit ``i % 8`` of byte ``i // 8``).

The decode is standard ONNX (opset >= 11) that ONNX Runtime and TVM's ONNX importer both run: the bytes
unpacked to float 0/1 by the bit-plane arithmetic the weight-only quantize decode uses
(Cast/Mul/Floor/Sub), Cast to int32, ``idx = CumSum(bit) * bit`` (the 1-based rank of a kept weight, 0
for a pruned one), ``Gather(values, idx)`` and Reshape to ``w``'s shape. Pruned weights read the leading
``0.0`` (exactly ``+0.0``: no multiply by the mask, which would turn ``-x * 0`` into ``-0.0``), so the
decoded weight equals ``w`` bit for bit. The first op (Cast of the packed bytes to float) is 32x larger
than its input, so fold-constants leaves the decode in place (it never inflates a constant).
"""

from __future__ import annotations

import numpy as np

#: Smallest default-domain opset the decode runs at (CumSum).
MIN_OPSET = 11


def decode_bytes(prefix: str) -> int:
    """About what one decode's 14 nodes and small constants add to the .onnx file (measured: ~1230-1410 bytes
    plus ~57 per character of the name prefix, repeated in every node and tensor name), counted by
    storage=auto so a small weight is not "compressed" into a larger file."""
    return 1280 + 58 * len(prefix.encode())


def kept_mask(w: np.ndarray) -> np.ndarray:
    """True where ``w`` (float32) is anything but ``+0.0`` (bit pattern all zero)."""
    return np.ascontiguousarray(w, dtype=np.float32).view(np.uint32) != 0


def encode(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(values, packed_mask)`` of float32 ``w``: ``values`` = [0.0, kept weights row-major], the mask
    packed little-endian 8 per byte."""
    flat = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
    keep = kept_mask(flat)
    values = np.concatenate([np.zeros(1, np.float32), flat[keep]]).astype(np.float32)
    return values, np.packbits(keep, bitorder="little")


def decode(values: np.ndarray, packed: np.ndarray, shape) -> np.ndarray:
    """numpy reference of the in-graph decode."""
    n = int(np.prod(shape, dtype=np.int64))
    bit = np.unpackbits(packed, bitorder="little")[:n].astype(np.int64)
    idx = np.cumsum(bit) * bit
    return values[idx].reshape(shape)


def sparse_bytes(w: np.ndarray) -> int:
    """Bytes of ``values`` + ``mask`` for ``w`` (the data the sparse form stores)."""
    nnz = int(np.count_nonzero(kept_mask(w)))
    return 4 * (nnz + 1) + (w.size + 7) // 8


def emit_decode(b, values: np.ndarray, packed: np.ndarray, shape) -> object:
    """Emit the decode into Builder ``b`` (float32 builder); returns the tensor holding the dense weight."""
    n = int(np.prod(shape, dtype=np.int64))
    nb = packed.shape[0]
    f = b.op("Cast", [b.const(packed.reshape(nb, 1))], {"to": 1})  # [nb, 1] float bytes
    q = b.op("Floor", [b.mul(f, b.const((0.5 ** np.arange(8)).reshape(1, 8).astype(np.float32)))])  # byte >> k
    bit = b.sub(q, b.mul(b.op("Floor", [b.mul(q, b.const(np.float32(0.5)))]), b.const(np.float32(2.0))))
    bit = b.reshape(bit, [nb * 8])
    if nb * 8 != n:
        bit = _slice(b, bit, n)
    ib = b.op("Cast", [bit], {"to": 6})  # int32 0/1
    idx = b.mul(b.op("CumSum", [ib, b.const(np.array(0, np.int32))]), ib)  # 1-based rank if kept, else 0
    dense = b.op("Gather", [b.const(values), idx], {"axis": 0})
    return b.reshape(dense, [int(d) for d in shape])


def _slice(b, x, end: int):
    return b.op("Slice", [x, b.const(np.array([0], np.int64)), b.const(np.array([end], np.int64)),
                          b.const(np.array([0], np.int64))])
