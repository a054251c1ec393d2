"""The numerics of the quantize pass, free of graph code: activation ranges, weight grids, GPTQ, bit packing.

* Activation ranges come from a histogram of each tensor over the calibration
  set (:class:`Observer`), chosen by ``minmax``, ``percentile``, ``mse``
  (the clipping that minimizes the expected squared quantization error of the
  observed values) or ``entropy`` (TensorRT's KL-divergence threshold).
* Weights of ``static``/``dynamic`` are int8, symmetric, one scale per output
  channel. Weight-only grids are asymmetric, ``2^bits`` levels per group
  (``code * scale + offset``, scale and offset stored as float16), the
  clipping of each group searched for the least squared error.
* :func:`gptq` rounds a weight matrix column by column, pushing each column's
  rounding error onto the columns not yet rounded through the inverse of the
  calibration Hessian ``X^T X`` (Frantar et al., GPTQ, 2022: OBS applied
  column-wise), which is what makes 2- and 3-bit weights usable.
* :func:`pack_bitplanes` stores b-bit codes in b bit-planes of one bit per
  code, so any width from 1 to 8 packs densely (n codes -> ceil(n/8) * b bytes)
  and decodes with float ops every ONNX runtime has (see quantize.py).

Weight matrices here are ``[out, in]``: rows are output channels, columns the
reduction dim in the order the layer's input columns ``X`` come in.
"""

from __future__ import annotations

import numpy as np

BINS = 2048


class Observer:
    """Range, then histogram, of one activation tensor over the calibration set (two passes)."""

    def __init__(self) -> None:
        self.lo, self.hi = np.inf, -np.inf
        self.hist: np.ndarray | None = None

    def see_range(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32)
        fin = x[np.isfinite(x)]
        if fin.size:
            self.lo = min(self.lo, float(fin.min()))
            self.hi = max(self.hi, float(fin.max()))

    @property
    def edges(self) -> tuple[float, float]:
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)  # zero is always exactly representable
        if not np.isfinite(lo) or not np.isfinite(hi) or hi - lo < 1e-12:
            return -1e-6, 1e-6
        return lo, hi

    def see_values(self, x: np.ndarray) -> None:
        h, _ = np.histogram(np.asarray(x, np.float32), bins=BINS, range=self.edges)
        self.hist = h.astype(np.float64) if self.hist is None else self.hist + h

    def centers(self) -> np.ndarray:
        lo, hi = self.edges
        step = (hi - lo) / BINS
        return lo + step * (np.arange(BINS) + 0.5)


def affine_params(lo: float, hi: float, signed: bool) -> tuple[np.float32, int]:
    """(scale, zero point) of the int8 (symmetric) or uint8 (asymmetric) grid covering [lo, hi] (zero inside)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if signed:
        t = max(abs(lo), abs(hi))
        scale = t / 127.0 if t > 0 else 1.0
        return np.float32(scale), 0
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zero = int(np.clip(np.round(-lo / scale), 0, 255))
    return np.float32(scale), zero


def _grid_error(centers, counts, scale, zero, qmin, qmax) -> float:
    q = np.clip(np.round(centers / scale) + zero, qmin, qmax)
    return float(np.sum(counts * ((q - zero) * scale - centers) ** 2))


def _kl_threshold(hist_abs: np.ndarray, levels: int) -> int:
    """Bin count i that minimizes KL(P||Q) of the |x| histogram clipped at bin i and merged into ``levels``."""
    best, best_i = np.inf, len(hist_abs)
    total = hist_abs.sum()
    if total <= 0:
        return len(hist_abs)
    tail = np.cumsum(hist_abs[::-1])[::-1]  # tail[i]: values at or beyond bin i
    for i in range(levels, len(hist_abs) + 1, 16):
        # KL cannot see what clipping costs a distribution of a few spikes (one-hot inputs, saturated
        # activations): folding a spike into the last bin leaves P and Q alike. Never clip more than 0.1 %.
        if i < len(hist_abs) and tail[i] > 1e-3 * total:
            continue
        p = hist_abs[:i].copy()
        p[-1] += hist_abs[i:].sum()
        nz = p > 0
        chunks = np.array_split(np.arange(i), levels)
        q = np.zeros(i)
        for c in chunks:
            mask = nz[c]
            if mask.any():
                q[c[mask]] = p[c].sum() / mask.sum()
        pn, qn = p / p.sum(), q / max(q.sum(), 1e-300)
        m = nz & (qn > 0)
        kl = float(np.sum(pn[m] * np.log(pn[m] / qn[m]))) + (np.inf if np.any(nz & (qn == 0)) else 0.0)
        if kl < best:
            best, best_i = kl, i
    return best_i


def activation_params(obs: Observer, method: str, signed: bool, percentile: float = 99.99) -> tuple[np.float32, int]:
    """(scale, zero point) for one activation tensor from its observed values, by ``method``."""
    lo, hi = obs.edges
    if method == "minmax" or obs.hist is None or obs.hist.sum() == 0:
        return affine_params(lo, hi, signed)
    centers, counts = obs.centers(), obs.hist
    if method == "percentile":
        cdf = np.cumsum(counts) / counts.sum()
        tail = (100.0 - percentile) / 100.0
        a = centers[min(np.searchsorted(cdf, tail), BINS - 1)] if lo < 0 else 0.0
        b = centers[min(np.searchsorted(cdf, 1.0 - tail), BINS - 1)] if hi > 0 else 0.0
        return affine_params(min(a, 0.0), max(b, 0.0), signed)
    if method == "mse":
        qmin, qmax = (-127, 127) if signed else (0, 255)
        best, best_p = np.inf, affine_params(lo, hi, signed)
        ratios = np.linspace(0.05, 1.0, 40)
        for ra in ratios if lo < 0 else [1.0]:
            for rb in ratios if hi > 0 else [1.0]:
                if signed and ra != rb and lo < 0 and hi > 0:
                    continue  # symmetric grids scale both ends together
                scale, zero = affine_params(lo * ra, hi * rb, signed)
                err = _grid_error(centers, counts, scale, zero, qmin, qmax)
                if err < best:
                    best, best_p = err, (scale, zero)
        return best_p
    if method == "entropy":
        # KL on |x|: the clipping threshold T, applied to both ends of the observed range.
        edges = np.linspace(0.0, max(abs(lo), abs(hi)), BINS + 1)
        absc = np.abs(centers)
        habs, _ = np.histogram(absc, bins=edges, weights=counts)
        levels = 128 if (signed or lo < 0) else 256
        i = _kl_threshold(habs, levels)
        t = edges[i]
        return affine_params(max(lo, -t), min(hi, t), signed)
    raise ValueError(f"unknown calibration method {method!r}")


# ------------------------------------------------------------------------------------------ weights
def int8_per_channel(w2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes in [-127, 127] and one float32 scale per row of ``w2`` ([out, in])."""
    amax = np.max(np.abs(w2), axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    codes = np.clip(np.round(w2 / scale[:, None]), -127, 127).astype(np.int8)
    return codes, scale


def _fp16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float64)


def group_grid(w: np.ndarray, bits: int, search: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) per row of ``w`` ([rows, n]) for ``2^bits`` levels, both exactly float16-representable.

    The range of each row is shrunk (``search``) to the clipping with the least
    squared error of its own values, as quantization-aware weight tools do.
    """
    levels = (1 << bits) - 1
    lo, hi = w.min(axis=1), w.max(axis=1)
    best_s = best_m = None
    best_err = np.full(w.shape[0], np.inf)
    for r in (np.linspace(1.0, 0.5, 26) if search else [1.0]):
        # The scale is stored as float16: floor it at float16's smallest step (2^-24), not at a value that
        # rounds to 0 there (a constant row would divide by zero and its codes would be NaN cast to int).
        s = _fp16(np.maximum((hi - lo) * r / levels, 2.0 ** -24))
        m = _fp16(lo * r)
        q = np.clip(np.round((w - m[:, None]) / s[:, None]), 0, levels)
        err = np.sum((q * s[:, None] + m[:, None] - w) ** 2, axis=1)
        if best_s is None:
            best_s, best_m, best_err = s.copy(), m.copy(), err
        else:
            better = err < best_err
            best_s[better], best_m[better], best_err[better] = s[better], m[better], err[better]
    return best_s, best_m


def quantize_grid(w: np.ndarray, scale: np.ndarray, offset: np.ndarray, bits: int) -> np.ndarray:
    return np.clip(np.round((w - offset[..., None]) / scale[..., None]), 0, (1 << bits) - 1)


def round_nearest(w2: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes [out, ng*group], scales and offsets [out, ng]: round-to-nearest on searched per-group grids."""
    out, n = w2.shape
    g = group or n
    ng = -(-n // g)
    wp = np.zeros((out, ng * g))
    wp[:, :n] = w2
    wp[:, n:] = w2[:, -1:] if n else 0.0  # padding repeats a real value: it never widens a group's range
    blocks = wp.reshape(out * ng, g)
    s, m = group_grid(blocks, bits)
    codes = quantize_grid(blocks, s, m, bits)
    return codes.reshape(out, ng * g), s.reshape(out, ng), m.reshape(out, ng)


def gptq(w2: np.ndarray, hessian: np.ndarray, bits: int, group: int, damp: float = 0.01,
         block: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ rounding of ``w2`` ([out, in]) given ``hessian`` ([in, in], ~ X^T X of the layer's inputs).

    Returns codes, scales and offsets as :func:`round_nearest`. Columns are
    rounded in order; each one's error, scaled by the inverse Hessian's Cholesky
    factor, is subtracted from the columns still to come. Group grids are set
    when their first column is reached, from the weights as updated so far.
    Columns whose inputs are always zero are rounded as they are.
    """
    w = np.array(w2, dtype=np.float64)
    out, n = w.shape
    g = group or n
    ng = -(-n // g)
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h += damp * np.mean(np.diag(h)) * np.eye(n)
    try:
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper factor U with inv(H) = U^T U
    except np.linalg.LinAlgError:
        return round_nearest(w2, bits, group)
    codes = np.zeros((out, ng * g))
    scales = np.zeros((out, ng))
    offsets = np.zeros((out, ng))
    if group == 0:
        s_all, m_all = group_grid(w, bits)
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        wb = w[:, b0:b1].copy()
        errs = np.zeros_like(wb)
        for i in range(b0, b1):
            j = i - b0
            if group:
                if i % g == 0:
                    gi = i // g
                    # The grid sees the group as updated so far (later columns still move a little).
                    cols = np.concatenate([wb[:, j:], w[:, b1:]], axis=1)[:, :min(g, n - i)]
                    s, m = group_grid(cols, bits)
                    scales[:, gi], offsets[:, gi] = s, m
                s, m = scales[:, i // g], offsets[:, i // g]
            else:
                s, m = s_all, m_all
            col = wb[:, j]
            q = np.clip(np.round((col - m) / s), 0, (1 << bits) - 1)
            codes[:, i] = q
            deq = q * s + m
            err = (col - deq) / hinv[i, i]
            wb[:, j:] -= np.outer(err, hinv[i, i:b1])
            errs[:, j] = err
        w[:, b1:] -= errs @ hinv[b0:b1, b1:]
    if group == 0:
        scales[:, 0], offsets[:, 0] = s_all, m_all
    if ng * g > n:  # padding columns decode to the offset; they are sliced off in the graph
        codes[:, n:] = 0
    return codes, scales, offsets


def dequantize(codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray, n: int) -> np.ndarray:
    """The float matrix [out, n] the graph's decode computes (float32 arithmetic, as the graph does)."""
    out, ng = scales.shape
    g = codes.shape[1] // ng
    c = codes.reshape(out, ng, g).astype(np.float32)
    w = c * scales.astype(np.float16).astype(np.float32)[..., None] + offsets.astype(np.float16).astype(np.float32)[..., None]
    return w.reshape(out, ng * g)[:, :n]


# -------------------------------------------------------------------------------------- bit packing
def pack_bitplanes(codes: np.ndarray, bits: int) -> np.ndarray:
    """``codes`` (flat, values < 2^bits) as uint8 [ceil(n/8), bits]: byte [j, p] bit t = bit p of code 8j+t."""
    flat = np.asarray(codes).reshape(-1).astype(np.uint8)
    n8 = -(-flat.size // 8) * 8
    c = np.zeros(n8, np.uint8)
    c[:flat.size] = flat
    c = c.reshape(-1, 8)
    weights = (1 << np.arange(8)).astype(np.uint16)
    planes = [(((c >> p) & 1).astype(np.uint16) * weights).sum(axis=1).astype(np.uint8) for p in range(bits)]
    return np.stack(planes, axis=1)


def unpack_bitplanes(packed: np.ndarray, n: int) -> np.ndarray:
    """The inverse of :func:`pack_bitplanes` (numpy; the graph decodes with float ops)."""
    nb, bits = packed.shape
    t = np.arange(8)
    bitsv = (packed[:, None, :] >> t[None, :, None]) & 1  # [nb, 8, bits]
    codes = (bitsv.astype(np.int64) << np.arange(bits)[None, None, :]).sum(axis=2)
    return codes.reshape(-1)[:n].astype(np.uint8)
