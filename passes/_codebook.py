"""Weight sharing's math and storage: 1-D k-means codebooks, packed indices, shared rows, and their in-graph decodes.

**Codebooks.** :func:`kmeans` clusters the values of each row of a matrix (one
row: a whole tensor; one row per output channel) into ``2**bits`` centroids,
minimising ``sum h * (w - c)**2`` (``h``: a weight per value, 1 without data).
In one dimension the clusters are runs of the sorted values, so a Lloyd
iteration is a search of the ``K - 1`` midpoints in the sorted row and a
difference of prefix sums: ``O(K log n)`` per row after one sort, all rows at
once, each iteration only on the rows still moving (a 1M-value tensor clusters
in well under a second). The start is deterministic: centroids spread as an
optimal fine quantizer spreads them (density proportional to the cube root of
the weighted value density, Panter-Dite, from a histogram), then Lloyd to
convergence. A row with at most ``K`` distinct values gets exactly them as its
codebook (a binary ``±alpha`` row at 1 bit, a ternary one at 2). Ties go to the
lower centroid.

**Indices.** ``bits < 8``: bit-planes packed 8 per byte, ``uint8 [nb, bits, 1]``
(index ``i``'s bit ``p`` is bit ``i % 8`` of byte ``[i // 8, p]``); ``bits = 8``:
one byte per index. The indices of several layers (same bits, up to
:data:`CHUNK` in all) are packed into one initializer and unpacked together by
standard ONNX (opset >= 11), in float so fold-constants never inflates the
packed bytes (its first op, the Cast to float, is 4x larger than its input):
``Cast`` -> ``Mul`` by ``2**-k`` -> ``Floor`` (``byte >> k``) -> ``Mod 2``
(``fmod=1``) -> ``MatMul`` by ``[1, 2, .., 2**(bits-1)]`` (the index, exact
small integers) -> ``Reshape`` flat -> ``Cast`` int32 -> ``Split`` per layer.
Each layer then reads its codebook: ``Gather`` (``Reshape`` + ``GatherElements``
per channel) -> ``Reshape`` to the weight's shape. Unpacking together costs
each layer two or three nodes instead of ten: on small models the decode's
nodes are a good part of the file.

**Shared rows.** :func:`merge_rows` keeps, in order, each output row whose
``|cosine|`` with every earlier kept row is below a threshold; the others become
``scale * kept row`` (least-squares ``scale``; the kept rows have scale 1.0).
Stored as the kept rows, an int32 index per row and a float32 scale per row,
decoded by ``Gather`` -> ``Mul`` -> ``Reshape``.

Both decodes end in a ``Reshape`` to a constant shape whose inputs reach only
initializers: what ``targets/lowbit.py: decoded_weight_bytes`` recognizes, so the
CPU target decodes the weight once at lower time. Everything here is a function
of its inputs only (no randomness, stable tie-breaking).
"""

from __future__ import annotations

import numpy as np

from graphopt.relax import MIN_PARAM_ELEMENTS

from ._emit import Namer

#: Smallest default-domain opset the decodes run at (GatherElements, Mod with fmod, Slice with inputs).
MIN_OPSET = 11
#: Lloyd iterations at most (each touches only the rows still moving; most converge in a few dozen).
MAX_ITER = 300
#: Indices unpacked together at most (layers' indices share one unpacking up to this many).
CHUNK = 1 << 20
#: Rows of the cosine matrix computed at once by :func:`merge_rows`.
MERGE_BLOCK = 1024
#: |cosine| this close below the threshold still counts (float64 rounding of exactly proportional rows).
COS_SLACK = 1e-10


# ------------------------------------------------------------------------------------------------ k-means
def _search(keys: np.ndarray, n: int, rows: np.ndarray, queries: np.ndarray, side: str) -> np.ndarray:
    """``searchsorted(sorted_rows[rows[i]], queries[i], side)`` for every ``i`` at once.

    ``keys`` is :func:`_keys` of the sorted rows (``n`` values each): complex numbers ``r + 1j * value``
    order by row, then value (numpy orders complex numbers lexicographically), so one search of the flat
    array answers all rows, exactly (no offset arithmetic on the values).
    """
    r = rows.astype(np.float64)[:, None]
    pos = np.searchsorted(keys, (r + 1j * queries).ravel(), side=side).reshape(queries.shape)
    return pos - (rows * n)[:, None]


def _keys(sorted_rows: np.ndarray) -> np.ndarray:
    return (np.arange(sorted_rows.shape[0], dtype=np.float64)[:, None] + 1j * sorted_rows).ravel()


class _Rows:
    """Sorted rows (float64 [rows, n]) with weights, their prefix sums and search keys."""

    def __init__(self, s: np.ndarray, h: np.ndarray):
        self.s, self.h = s, h
        self.rows, self.n = s.shape
        zero = np.zeros((self.rows, 1))
        # Prefix sums of h, h*v, h*v^2 per row ([rows, n + 1], read flat: row r's entry j at r * (n + 1) + j).
        self.c = [np.concatenate([zero, np.cumsum(x, axis=1)], axis=1).ravel() for x in (h, h * s, h * s * s)]
        self.keys = _keys(s)

    def edges(self, rows: np.ndarray, centroids: np.ndarray) -> np.ndarray:
        """Cluster boundaries of ``rows`` in their sorted values for ``centroids`` (ascending, [len(rows),
        K]): values up to a midpoint go to the lower centroid."""
        mid = (centroids[:, :-1] + centroids[:, 1:]) * 0.5
        inner = _search(self.keys, self.n, rows, mid, "right")
        k = len(rows)
        return np.concatenate([np.zeros((k, 1), np.int64), inner, np.full((k, 1), self.n, np.int64)], axis=1)

    def sums(self, rows: np.ndarray, edges: np.ndarray) -> list:
        """Per cluster: sum of h, h*v, h*v^2 (each [len(rows), K])."""
        base = (rows * (self.n + 1))[:, None]
        lo, hi = base + edges[:, :-1], base + edges[:, 1:]
        return [c[hi] - c[lo] for c in self.c]


def _lloyd(data: _Rows, c: np.ndarray) -> np.ndarray:
    """Lloyd iterations from centroids ``c`` [rows, K] (ascending) until no row changes; each iteration
    touches only the rows still moving."""
    c = c.copy()
    active = np.arange(data.rows)
    for _ in range(MAX_ITER):
        cur = c[active]
        sh, sv, _ = data.sums(active, data.edges(active, cur))
        new = np.sort(np.where(sh > 0, sv / np.where(sh > 0, sh, 1.0), cur), axis=1)
        moved = (new != cur).any(axis=1)
        c[active] = new
        active = active[moved]
        if not active.size:
            break
    return c


def _start(data: _Rows, k: int) -> np.ndarray:
    """Deterministic start: the centroid density of an optimal fine quantizer, proportional to the cube root
    of the (weighted) value density (Panter-Dite), from a histogram of ``2 sqrt(n)`` bins per row (16 to
    256: coarse enough to be smooth; measured on Gaussian and Student-t rows, 1 to 8 bits)."""
    s, h = data.s, data.h
    rows = data.rows
    bins = int(np.clip(2.0 * np.sqrt(data.n), 16, 256))
    lo, hi = s[:, :1], s[:, -1:]
    span = np.where(hi > lo, hi - lo, 1.0)
    b = np.minimum(((s - lo) / span * bins).astype(np.int64), bins - 1)
    hist = np.bincount((b + (np.arange(rows) * bins)[:, None]).ravel(), weights=h.ravel(),
                       minlength=rows * bins).reshape(rows, bins)
    cum = np.cumsum(np.cbrt(hist), axis=1)
    cum /= cum[:, -1:]
    target = np.broadcast_to(((np.arange(k) + 0.5) / k)[None, :], (rows, k))
    at = np.clip(_search(_keys(cum), bins, np.arange(rows), target, "left"), 0, bins - 1)  # first cum >= t
    c0 = np.where(at > 0, np.take_along_axis(cum, np.maximum(at - 1, 0), axis=1), 0.0)
    c1 = np.take_along_axis(cum, at, axis=1)
    frac = (target - c0) / np.where(c1 > c0, c1 - c0, 1.0)
    return np.sort(lo + (at + frac) / bins * span, axis=1)


def kmeans(values: np.ndarray, weight: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cluster each row of ``values`` [rows, n] (float32) into at most ``k`` values.

    ``weight`` (same shape, > 0, or None for 1): the weight of each value's squared error. Returns
    ``(codebook float32 [rows, K], index int64 [rows, n])`` with ``codebook[r, index[r, i]]`` the value
    given to ``values[r, i]``; ``K = k``, or the largest distinct count of a row when every row has at most
    ``k`` distinct values (then the codebook is exact). A row's unused entries repeat its last value.
    """
    v = np.asarray(values, dtype=np.float32)
    rows, n = v.shape
    order = np.argsort(v, axis=1, kind="stable")
    s = np.take_along_axis(v, order, axis=1).astype(np.float64)
    rank = np.zeros((rows, n), np.int64)  # index of each sorted value among its row's distinct values
    if n > 1:
        rank[:, 1:] = np.cumsum(s[:, 1:] != s[:, :-1], axis=1)
    distinct = rank[:, -1] + 1
    exact = distinct <= k
    width = int(distinct.max()) if exact.all() else k
    book = np.empty((rows, width), np.float64)
    seg = np.empty((rows, n), np.int64)
    if exact.any():
        er = np.nonzero(exact)[0]
        sub = np.empty((er.size, width), np.float64)
        sub[:] = s[er, -1:]  # padding: the row's largest value
        np.put_along_axis(sub, rank[er], s[er], axis=1)
        book[er] = sub
        seg[er] = rank[er]
    if not exact.all():
        lr = np.nonzero(~exact)[0]
        h = np.ones((lr.size, n)) if weight is None else \
            np.take_along_axis(np.asarray(weight, np.float64)[lr], order[lr], axis=1)
        book[lr], seg[lr] = _cluster(_Rows(s[lr], h), k)
    index = np.empty((rows, n), np.int64)
    np.put_along_axis(index, order, seg, axis=1)
    return book.astype(np.float32), index


def _cluster(data: _Rows, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k-means of sorted rows (each with more than ``k`` distinct values): ``(codebook [rows, k] of
    float32-exact values, the cluster of each sorted value)``."""
    rows, n = data.rows, data.n
    c = _lloyd(data, _start(data, k))
    # The codebook as stored (float32), and each value's nearest entry of it (ties: the lower one).
    c = np.sort(c.astype(np.float32).astype(np.float64), axis=1)
    edges = data.edges(np.arange(rows), c)
    marks = np.zeros((rows, n + 1), np.int64)
    np.add.at(marks, (np.repeat(np.arange(rows), k - 1), edges[:, 1:-1].ravel()), 1)
    return c, np.cumsum(marks[:, :n], axis=1)


# ------------------------------------------------------------------------------------------------ indices
def pack(index: np.ndarray, bits: int) -> np.ndarray:
    """Indices (< 2**bits, flattened) as stored: ``uint8 [nb, bits, 1]`` bit-planes, or ``uint8 [n]`` at 8 bits."""
    if bits == 8:
        return np.ascontiguousarray(index, dtype=np.uint8).reshape(-1)
    flat = np.asarray(index, dtype=np.int64).reshape(-1)
    nb = -(-flat.size // 8)
    pad = np.zeros(nb * 8, np.int64)
    pad[:flat.size] = flat
    planes = ((pad[:, None] >> np.arange(bits)[None, :]) & 1).astype(np.uint8)  # [nb*8, bits]
    planes = planes.reshape(nb, 8, bits).transpose(0, 2, 1)  # [nb, bits, 8]
    return np.ascontiguousarray(np.packbits(planes, axis=2, bitorder="little"))  # [nb, bits, 1]


def unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """numpy reference of the in-graph unpacking: the first ``n`` indices, int64, flat."""
    if bits == 8:
        return np.asarray(packed, dtype=np.int64).reshape(-1)[:n]
    planes = np.unpackbits(packed, axis=2, bitorder="little").astype(np.int64)  # [nb, bits, 8]
    index = (planes * (1 << np.arange(bits))[None, :, None]).sum(axis=1)  # [nb, 8]
    return index.reshape(-1)[:n]


def packed_bytes(n: int, bits: int) -> int:
    return n if bits == 8 else bits * (-(-n // 8))


def bits_for(entries: int) -> int:
    """Bits per index for a codebook of ``entries`` values (at least 1)."""
    return max(1, int(entries - 1).bit_length())


# ---------------------------------------------------------------------------------------- codebook storage
def encode(m: np.ndarray, axis: int | None, bits: int, weight: np.ndarray | None = None) -> dict:
    """A 2-D matrix ``m`` as a codebook of at most ``2**bits`` values: one for the whole matrix (``axis``
    None) or one per row (``axis`` 0) / per column (``axis`` 1). ``weight``: importance of each value's
    error (shape of ``m``), None for plain k-means.

    Returns ``{"codebook": float32 [K] | [rows, K] | [K, cols], "index": int64 flat in ``m``'s row-major
    order, "bits", "entries", "axis", "shape"}``: ``entries`` values per codebook are used (``bits`` is
    lower than asked when fewer suffice); a codebook of fewer than ``MIN_PARAM_ELEMENTS`` values in all
    is padded to that many (a smaller one would be a constant of the compiled code, and the CPU target
    would fold the decoded weight into it instead of decoding it once at lower time into the weights).
    """
    m = np.asarray(m, dtype=np.float32)
    v = m.reshape(1, -1) if axis is None else m if axis == 0 else m.T
    w = None if weight is None else (np.asarray(weight).reshape(1, -1) if axis is None else
                                     np.asarray(weight) if axis == 0 else np.asarray(weight).T)
    book, index = kmeans(v, w, 1 << bits)
    entries = book.shape[1]
    used = min(bits, bits_for(entries))
    if book.size < MIN_PARAM_ELEMENTS:  # repeat the last entry: the codebook stays a weight when compiled
        wide = -(-MIN_PARAM_ELEMENTS // book.shape[0])
        book = np.concatenate([book, np.repeat(book[:, -1:], wide - entries, axis=1)], axis=1)
    if axis is None:
        book = book[0]
    elif axis == 1:
        book, index = book.T, index.T
    return {"codebook": np.ascontiguousarray(book), "index": np.ascontiguousarray(index).reshape(-1), "bits": used,
            "entries": entries, "axis": axis, "shape": tuple(m.shape)}


def decode(enc: dict) -> np.ndarray:
    """numpy reference of the in-graph decode: the 2-D matrix an :func:`encode` result stands for."""
    index = np.asarray(enc["index"]).reshape(enc["shape"])
    book = enc["codebook"]
    if enc["axis"] is None:
        return book[index]
    return np.take_along_axis(book, index, axis=1 - enc["axis"])  # a codebook per row: gathered along a row


def encoded_bytes(enc: dict) -> int:
    """Bytes ``enc`` stores: its packed indices and its codebook."""
    return packed_bytes(enc["index"].size, enc["bits"]) + int(enc["codebook"].nbytes)


def chunks(sizes: list[tuple[object, int, int]]) -> list[list[object]]:
    """Which indices are unpacked together: ``sizes`` lists ``(key, bits, count)`` in graph order; keys of
    one bits value are grouped in order, at most :data:`CHUNK` indices a group (a larger one alone), so
    small layers share one unpacking and no decode materializes more than about one large layer."""
    out: list[list[object]] = []
    open_: dict[int, tuple[list, int]] = {}
    for key, bits, n in sizes:
        group, total = open_.get(bits, ([], 0))
        if group and total + n > CHUNK:
            out.append(group)
            group, total = [], 0
        group.append(key)
        open_[bits] = (group, total + n)
    out.extend(g for g, _ in open_.values() if g)
    return out


def emit_unpack(b, indices: list[np.ndarray], bits: int) -> list:
    """Emit the unpacking of ``indices`` (flat int arrays < ``2**bits``), packed together into one uint8
    initializer, into float32 Builder ``b``; returns one flat int32 tensor per array."""
    flat = np.concatenate([np.asarray(i, np.int64).reshape(-1) for i in indices])
    n = flat.size
    packed = pack(flat, bits)
    if bits == 8:
        idx = b.op("Cast", [b.const(packed)], {"to": 1})  # float first: fold-constants never inflates it (4x)
    else:
        nb = packed.shape[0]
        f = b.op("Cast", [b.const(packed)], {"to": 1})  # [nb, bits, 1] float bytes
        q = b.op("Floor", [b.mul(f, b.const((0.5 ** np.arange(8)).reshape(1, 1, 8).astype(np.float32)))])
        bit = b.op("Mod", [q, b.const(np.float32(2.0))], {"fmod": 1})  # [nb, bits, 8]: bit k of each plane
        idx = b.matmul(b.const((2.0 ** np.arange(bits)).reshape(1, bits).astype(np.float32)), bit)  # [nb, 1, 8]
        idx = b.reshape(idx, [nb * 8])
    idx = b.op("Cast", [idx], {"to": 6})  # int32
    sizes = [int(np.asarray(i).size) for i in indices]
    pad = (packed.shape[0] * 8 if bits < 8 else n) - n
    if len(sizes) == 1 and not pad:
        return [idx]
    if len(sizes) == 1:
        return [b.op("Slice", [idx, b.const(np.array([0], np.int64)), b.const(np.array([n], np.int64)),
                               b.const(np.array([0], np.int64))])]
    return b.split(idx, sizes + ([pad] if pad else []), 0)[:len(sizes)]


def emit_lookup(b, idx, enc: dict, out_shape) -> object:
    """Emit the codebook lookup of ``enc`` for its flat int32 indices ``idx``, reshaped to ``out_shape``."""
    book = b.const(enc["codebook"])
    if enc["axis"] is None:
        w = b.op("Gather", [book, idx], {"axis": 0})
    else:  # a codebook per row (column): gathered along the row (column)
        w = b.op("GatherElements", [book, b.reshape(idx, list(enc["shape"]))], {"axis": 1 - enc["axis"]})
    return b.reshape(w, [int(d) for d in out_shape])


# --------------------------------------------------------------------------------------------- shared rows
def merge_rows(w2: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``w2`` [N, cols] as scaled copies of earlier kept rows.

    Row ``i`` (in order) is mapped to the kept row of largest ``|cosine|`` with it (the earliest of equals)
    when that is at least ``threshold``, else kept. A zero row maps to the first kept row with scale 0.
    Returns ``(source [N] int64: the kept row each row copies (itself when kept), scale [N] float64)``.
    """
    w = np.asarray(w2, dtype=np.float64)
    n_rows = w.shape[0]
    norm = np.linalg.norm(w, axis=1)
    unit = w / np.where(norm > 0, norm, 1.0)[:, None]
    source = np.arange(n_rows)
    kept: list[int] = []
    for i0 in range(0, n_rows, MERGE_BLOCK):
        i1 = min(i0 + MERGE_BLOCK, n_rows)
        old = np.array(kept, np.int64)
        c_old = np.abs(unit[i0:i1] @ unit[old].T) if old.size else np.zeros((i1 - i0, 0))
        c_new = np.abs(unit[i0:i1] @ unit[i0:i1].T)
        new: list[int] = []
        for i in range(i0, i1):
            if norm[i] == 0 and (kept or new):
                source[i] = kept[0] if kept else new[0]
                continue
            cand = np.concatenate([c_old[i - i0], c_new[i - i0, [j - i0 for j in new]]])
            if cand.size:
                j = int(np.argmax(cand))
                if cand[j] >= threshold - COS_SLACK:
                    source[i] = int(old[j]) if j < old.size else new[j - old.size]
                    continue
            new.append(i)
        kept.extend(new)
    return source, scales_for(w, source, w)


def scales_for(w: np.ndarray, source: np.ndarray, reps: np.ndarray) -> np.ndarray:
    """Least-squares scale of each row ``w[i]`` onto ``reps[source[i]]`` (rows of ``reps`` indexed like ``w``);
    1.0 where that row is its own source and reproduced exactly, 0 for a zero source."""
    r = np.asarray(reps, dtype=np.float64)[source]
    w = np.asarray(w, dtype=np.float64)
    den = np.einsum("ij,ij->i", r, r)
    num = np.einsum("ij,ij->i", w, r)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def emit_rows(b, reps, index: np.ndarray, scales: np.ndarray, axis: int, out_shape) -> object:
    """Emit ``Gather(reps, index, axis) * scales`` reshaped to ``out_shape``; ``reps``: a tensor [R, cols]
    (``axis`` 0) or [rows, R] (``axis`` 1)."""
    n = index.size
    g = b.op("Gather", [reps, b.const(np.asarray(index, np.int32))], {"axis": axis})
    s = np.asarray(scales, np.float32).reshape((n, 1) if axis == 0 else (1, n))
    return b.reshape(b.mul(g, b.const(s)), [int(d) for d in out_shape])


def decode_rows(reps: np.ndarray, index: np.ndarray, scales: np.ndarray, axis: int) -> np.ndarray:
    """numpy reference of :func:`emit_rows` (before the reshape), float32 as the graph computes it."""
    g = np.take(np.asarray(reps, np.float32), index, axis=axis)
    s = np.asarray(scales, np.float32)
    return g * (s[:, None] if axis == 0 else s[None, :])


# --------------------------------------------------------------------------------------------- file bytes
class ShortNamer(Namer):
    """Fresh names ``<hint><n>`` (``conv1/Floor12``) instead of ``<hint>/graphopt_<n>``: a decode is part of a
    weight's storage, and its ~10 names are written twice each (as an output and an input), so long names
    are a large part of a small layer's decode. Collision-free like :class:`Namer` (same ``taken`` set)."""

    def fresh(self, hint: str) -> str:
        hint = hint.replace("_out", "")  # the Builder's output hint: the counter already tells them apart
        while True:
            self.counter += 1
            name = f"{hint}{self.counter}"
            if name not in self.taken:
                self.taken.add(name)
                return name


def emitted_bytes(b) -> int:
    """About what the nodes a Builder emitted and the constants they read add to a serialized model
    (protobuf sizes of the nodes; a constant's payload plus its name and header)."""
    import onnx

    total, seen = 0, set()
    for node in b.nodes:
        proto = onnx.helper.make_node(node.op, [t.name for t in node.inputs], [t.name for t in node.outputs],
                                      name=node.name, **node.attrs)
        total += proto.ByteSize() + 3
        for t in node.inputs:
            values = getattr(t, "_values", None)
            if values is not None and id(t) not in seen:
                seen.add(id(t))
                arr = np.asarray(t.values)
                total += arr.nbytes + len(t.name.encode()) + 12 + 3 * arr.ndim
    return total
