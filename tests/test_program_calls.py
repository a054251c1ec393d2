"""Calling a compiled program: zero-copy where safe, never aliasing an input, a weight or another output."""

import numpy as np
import onnx
from onnx import helper

import graphopt
from tests.conftest import init, make_model, vi


def _lower(tmp_path, model):
    onnx.save(model, tmp_path / "m.onnx")
    graphopt.lower(str(tmp_path / "m.onnx"), "cpu", tmp_path / "art")
    return graphopt.load(tmp_path / "art")


def test_outputs_that_are_an_input_or_a_weight_are_copies(tmp_path):
    w = np.arange(32, dtype=np.float32).reshape(2, 16)
    m = make_model([helper.make_node("Identity", ["x"], ["same"]), helper.make_node("Identity", ["W"], ["weight"]),
                    helper.make_node("Add", ["x", "W"], ["sum"])],
                   [vi("x", [2, 16])], [vi("same", [2, 16]), vi("weight", [2, 16]), vi("sum", [2, 16])], [init("W", w)])
    art = _lower(tmp_path, m)
    x = np.ones((2, 16), np.float32)
    out = art.run({"x": x})
    out["same"][:] = -1
    out["weight"][:] = -1
    np.testing.assert_array_equal(x, 1)  # the caller's input is untouched
    again = art.run({"x": x})
    np.testing.assert_array_equal(again["weight"], w)  # the model's weight is untouched
    np.testing.assert_array_equal(again["sum"], w + 1)


def test_unaligned_and_non_contiguous_inputs_give_the_same_result(tmp_path):
    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [vi("x", [4, 16])], [vi("y", [4, 8])], [init("W", w)])
    art = _lower(tmp_path, m)
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    ref = art.run({"x": x})["y"]
    raw = np.zeros(x.nbytes + 4, np.uint8)[4:].view(np.float32).reshape(4, 16)  # misaligned by 4 bytes
    raw[:] = x
    wide = np.zeros((4, 32), np.float32)
    wide[:, ::2] = x  # a strided view
    ro = x.copy()
    ro.flags.writeable = False
    for arr in (raw, wide[:, ::2], ro):
        np.testing.assert_allclose(art.run({"x": arr})["y"], ref, rtol=1e-6)
    np.testing.assert_allclose(ref, x @ w, rtol=1e-4, atol=1e-5)


def _identity_and_double(tmp_path, shape):
    m = make_model([helper.make_node("Identity", ["x"], ["same"]), helper.make_node("Add", ["x", "x"], ["twice"])],
                   [vi("x", list(shape))], [vi("same", list(shape)), vi("twice", list(shape))])
    return _lower(tmp_path, m)


def test_reused_input_buffers_never_leak_into_earlier_results(tmp_path):
    """Small inputs are copied into a buffer reused by the next call: results must not share it."""
    art = _identity_and_double(tmp_path, (2, 8))
    first = art.run({"x": np.full((2, 8), 1, np.float32)})
    second = art.run({"x": np.full((2, 8), 5, np.float32)})
    np.testing.assert_array_equal(first["same"], 1)
    np.testing.assert_array_equal(first["twice"], 2)
    np.testing.assert_array_equal(second["same"], 5)
    np.testing.assert_array_equal(second["twice"], 10)


def test_concurrent_calls_from_threads_keep_their_own_inputs(tmp_path):
    """Each thread stages its inputs in buffers of its own: concurrent calls do not mix them."""
    from concurrent.futures import ThreadPoolExecutor

    art = _identity_and_double(tmp_path, (4, 16))
    prog = art.programs["main"]

    def work(k):
        bad = 0
        for _ in range(200):
            same, twice = prog([np.full((4, 16), k, np.float32)])
            bad += int(not (np.all(same == k) and np.all(twice == 2 * k)))
        return bad

    with ThreadPoolExecutor(4) as pool:
        assert sum(pool.map(work, range(1, 9))) == 0


def test_large_inputs_reuse_one_staging_buffer_and_aligned_ones_are_not_copied(tmp_path):
    """An unaligned input of any size up to STAGE_MAX_BYTES is copied into one buffer per thread and input,
    kept while its shape stays (a fresh aligned copy per call cost 120 us for 128 KiB); a new shape replaces
    it; an aligned, contiguous, writable input of ZERO_COPY_MIN_BYTES or more is passed as it is."""
    art = _identity_and_double(tmp_path, ("n", 64, 256))  # 64 KiB per batch row
    prog = art.programs["main"]
    x = np.zeros(2 * 64 * 256 * 4 + 4, np.uint8)[4:].view(np.float32).reshape(2, 64, 256)  # misaligned
    x[:] = 3
    ptrs = set()
    for k in range(3):
        x[:] = k
        t, ptr = prog._tensor(0, x)
        ptrs.add(ptr)
        same, twice = prog([x])
        assert np.all(same == k) and np.all(twice == 2 * k)
    assert len(ptrs) == 1 and ptr % 64 == 0  # one staging buffer for the three calls
    first = art.run({"x": x})
    bigger = np.full((3, 64, 256), 7, np.float32)
    other = np.zeros(x.nbytes + 8, np.uint8)[8:].view(np.float32).reshape(x.shape)  # another misaligned array
    assert prog._tensor(0, other)[1] == ptr  # same shape: same buffer
    assert np.all(art.run({"x": bigger})["twice"] == 14) and np.all(first["same"] == 2)  # earlier results intact
    aligned = prog._aligned_empty((2, 64, 256), np.dtype(np.float32))
    aligned[:] = 1
    _, ptr4 = prog._tensor(0, aligned)
    assert ptr4 == aligned.ctypes.data  # zero-copy
