"""The numerics of the prune pass, free of graph code: importance scores, masks, OBS compensation.

Weight matrices are ``[out, in]`` as in :mod:`passes._quant_math`: rows are
output channels, columns the reduction dim in the order the layer's input
columns ``X`` come in (``C * kernel`` for a conv, channel outermost).

* Importance: ``magnitude`` is ``|W|``; ``activation`` is ``|W_ij| * ||X_j||``
  (Sun et al., Wanda, 2023), the column norms read off the diagonal of the
  calibration Hessian ``X^T X``.
* Masks (True = pruned) remove the least important weights: ``k`` of a whole
  matrix (:func:`unstructured_mask`), the lowest over several matrices at once
  with a per-matrix cap (:func:`global_counts`), or ``n`` kept in every ``m``
  consecutive columns of each row (:func:`nm_mask`). Ties go to the lower flat
  index (stable sorts), so masks are deterministic.
* :func:`obs_compensate` updates the kept weights to cancel the pruned ones'
  contribution to the layer's output error ``||X (W - W_pruned)^T||`` (damped
  Hessian ``H = X^T X + λ I``). Where it is affordable (sum over rows of
  kept^3 up to :data:`EXACT_FLOPS`) each row is solved exactly, the least-squares
  optimum for its mask (Optimal Brain Surgeon for several weights at once);
  larger layers go column by column, each column's removal error moved onto
  the columns not yet visited through the Cholesky factor of ``H^-1``
  (Frantar & Alistarh, SparseGPT, 2023, with a fixed mask), the same
  machinery as GPTQ.
"""

from __future__ import annotations

import numpy as np


def importance(w2: np.ndarray, col_sq: np.ndarray | None) -> np.ndarray:
    """|W| (``col_sq`` None) or |W| * ||X_j|| with ``col_sq`` the per-column sums of squares of X."""
    a = np.abs(np.asarray(w2, np.float64))
    if col_sq is None:
        return a
    return a * np.sqrt(np.maximum(np.asarray(col_sq, np.float64), 0.0))[None, :]


def unstructured_mask(score: np.ndarray, k: int) -> np.ndarray:
    """True at the ``k`` lowest scores of ``score`` (ties: lower flat index first)."""
    flat = score.reshape(-1)
    mask = np.zeros(flat.size, bool)
    if k > 0:
        mask[np.argsort(flat, kind="stable")[:k]] = True
    return mask.reshape(score.shape)


def normalized(score: np.ndarray) -> np.ndarray:
    """``score`` over its mean, so one threshold compares layers of different scale (all-zero stays zero)."""
    m = float(score.mean()) if score.size else 0.0
    return score / m if m > 0 else np.zeros_like(score)


def global_counts(scores: list[np.ndarray], total: int, cap: float) -> list[int]:
    """How many weights each matrix loses when the ``total`` lowest of all (normalized) scores go, no matrix
    losing more than ``floor(cap * size)``: a matrix that would is held at its cap and the rest of the
    budget is spread over the others by the same rule, until nothing is over."""
    sizes = [s.size for s in scores]
    limits = [int(np.floor(cap * n)) for n in sizes]
    fixed: dict[int, int] = {}
    while True:
        free = [i for i in range(len(scores)) if i not in fixed]
        budget = max(total - sum(fixed.values()), 0)
        counts = dict(fixed)
        if free:
            flat = np.concatenate([scores[i].reshape(-1) for i in free])
            owner = np.concatenate([np.full(sizes[i], j) for j, i in enumerate(free)])
            order = np.argsort(flat, kind="stable")[:min(budget, flat.size)]
            per = np.bincount(owner[order], minlength=len(free))
            counts.update({i: int(per[j]) for j, i in enumerate(free)})
        over = [i for i in free if counts[i] > limits[i]]
        if not over:
            return [counts[i] for i in range(len(scores))]
        for i in over:
            fixed[i] = limits[i]


def nm_mask(score: np.ndarray, n: int, m: int) -> np.ndarray:
    """True at the weights pruned so each row keeps its ``n`` most important of every ``m`` consecutive
    columns; a last group of ``t < m`` columns keeps ``ceil(n * t / m)``."""
    rows, cols = score.shape
    mask = np.zeros(score.shape, bool)
    full = cols // m * m
    if full:
        g = score[:, :full].reshape(rows, full // m, m)
        order = np.argsort(g, axis=2, kind="stable")[:, :, :m - n]
        gm = np.zeros(g.shape, bool)
        np.put_along_axis(gm, order, True, axis=2)
        mask[:, :full] = gm.reshape(rows, full)
    t = cols - full
    if t:
        drop = t - -(-n * t // m)
        if drop:
            order = np.argsort(score[:, full:], axis=1, kind="stable")[:, :drop]
            tm = np.zeros((rows, t), bool)
            np.put_along_axis(tm, order, True, axis=1)
            mask[:, full:] = tm
    return mask


#: Largest sum over rows of (kept weights)^3 for which :func:`obs_compensate` solves each row exactly.
EXACT_FLOPS = 2e9


def _exact(w: np.ndarray, h: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """Each row's kept weights moved to the least-squares optimum for its mask: ``H_KK d = H_KP w_P``."""
    out = w.copy()
    for r in range(w.shape[0]):
        p = mask[r]
        if not p.any():
            continue
        k = ~p
        if k.any():
            try:
                out[r, k] += np.linalg.solve(h[np.ix_(k, k)], h[np.ix_(k, p)] @ w[r, p])
            except np.linalg.LinAlgError:
                return None
        out[r, p] = 0.0
    return out if np.isfinite(out).all() else None


def obs_compensate(w2: np.ndarray, hessian: np.ndarray, mask: np.ndarray, damp: float = 0.01,
                   block: int = 128) -> np.ndarray | None:
    """``w2`` with the ``mask``ed weights set to exactly 0 and the others updated to cancel the output error
    on inputs with second moment ``hessian`` ([in, in], ~ X^T X); None when the damped Hessian is not
    positive definite. Columns whose inputs are always zero are pruned without update."""
    w = np.array(w2, dtype=np.float64)
    n = w.shape[1]
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h += damp * np.mean(np.diag(h)) * np.eye(n)
    kept = (~mask).sum(axis=1)
    if float(np.sum(kept.astype(np.float64) ** 3)) <= EXACT_FLOPS:
        return _exact(w, h, mask)
    try:
        u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper factor U with inv(H) = U^T U
    except np.linalg.LinAlgError:
        return None
    if not np.isfinite(u).all():
        return None
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        wb = w[:, b0:b1].copy()
        errs = np.zeros_like(wb)
        for i in range(b0, b1):
            j = i - b0
            col = wb[:, j]
            err = np.where(mask[:, i], col, 0.0) / u[i, i]
            wb[:, j:] -= np.outer(err, u[i, i:b1])
            errs[:, j] = err
        w[:, b0:b1] = wb
        w[:, b1:] -= errs @ u[b0:b1, b1:]
    w[mask] = 0.0
    return w


#: Sparsities at which scope=global measures each layer's output error (with calibration data).
ERROR_GRID = (0.0, 0.25, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.96, 0.98)


def output_error(w2: np.ndarray, new: np.ndarray, hessian: np.ndarray) -> tuple[float, float]:
    """(``tr(D H D^T)``, ``tr(W H W^T)``) with ``D = new - w2``: the layer's squared output error on inputs with
    second moment ``hessian`` and its squared output, both summed over the calibration rows."""
    d = np.asarray(new, np.float64) - np.asarray(w2, np.float64)
    h = np.asarray(hessian, np.float64)
    w = np.asarray(w2, np.float64)
    return float(((d @ h) * d).sum()), float(((w @ h) * w).sum())  # a 3-operand einsum loops in Python's order


def error_counts(curves: list[list[tuple[int, float]]], total: int) -> list[int]:
    """How many weights each layer loses so ``total`` go in all with the least summed relative output error.

    ``curves[l]`` lists (weights removed, relative error) for layer ``l``, increasing in the count and
    starting at (0, 0). Greedy on the lower convex hull: the move with the least error added per weight
    removed goes first; the last move stops part-way at exactly ``total``."""
    at = [0] * len(curves)
    counts = [0] * len(curves)
    left = total
    while left > 0:
        best = None
        for li, curve in enumerate(curves):
            k0, e0 = curve[at[li]]
            for j in range(at[li] + 1, len(curve)):
                k1, e1 = curve[j]
                if k1 <= k0:
                    continue
                rate = (e1 - e0) / (k1 - k0)
                if best is None or rate < best[0] - 1e-15:
                    best = (rate, li, j)
        if best is None:
            break
        _, li, j = best
        step = curves[li][j][0] - counts[li]
        if step >= left:
            counts[li] += left
            break
        counts[li] += step
        at[li] = j
        left -= step
    return counts
