"""``report.html`` of ``graphopt compare``: the table and two plots, in one self-contained file.

The plots (accuracy against the optimized model's ``.onnx`` size, and against the artifact's latency;
the Pareto front of best accuracy for the cost drawn as a staircase and its points filled; every point
labelled) are drawn with matplotlib (``pip install 'graphopt[report]'``), on an Agg canvas made for each
figure (no pyplot, no global backend switch; rc settings only inside :func:`matplotlib.rc_context`), and
embedded as inline SVG. The page has no external reference at all: no scripts, style sheets, fonts or
images to fetch, and the SVG's XML declaration, namespaces and metadata are dropped (an HTML parser
needs none of them). The SVG is deterministic (``svg.hashsalt`` per figure, no date), so the same
measurements give the same bytes; the latencies themselves are measured, so they differ between runs.

Without matplotlib the page has the table and a line saying how to get the plots.
"""

from __future__ import annotations

import html
import io
import re

from . import __version__

#: What the page says (and the CLI prints as a note) when matplotlib cannot be imported.
NO_MATPLOTLIB = "report.html has no plots: matplotlib is not installed (pip install 'graphopt[report]')"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 2em;
       color: #1d1d1f; background: #fff; }
h1 { font-size: 1.5em; margin-bottom: .2em; }
h2 { font-size: 1.15em; margin-top: 1.6em; }
.meta { color: #555; margin: .2em 0; }
table { border-collapse: collapse; margin-top: 1em; font-size: .88em; }
th, td { border-bottom: 1px solid #ddd; padding: .3em .55em; text-align: right; white-space: nowrap; }
th { background: #f3f4f6; }
td.name, td.spec, th.name, th.spec { text-align: left; }
td.spec { font-family: ui-monospace, "DejaVu Sans Mono", monospace; white-space: normal; max-width: 26em; }
td.spec .pass { white-space: nowrap; }
.scroll { overflow-x: auto; }
td.err { color: #b00020; text-align: left; white-space: normal; }
tr.baseline td { background: #f8fafc; }
.front { color: #0b6e4f; font-weight: 600; }
.plots { display: flex; flex-wrap: wrap; gap: 1.5em; }
figure { margin: 0; }
figure svg { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: .9em; max-width: 40em; }
.note { color: #8a4b00; }
footer { margin-top: 2em; color: #777; font-size: .85em; }
"""


# --------------------------------------------------------------------------- plots
def _bytes_unit(values) -> tuple[float, str]:
    top = max(values) if values else 1
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if top >= scale:
            return scale, unit
    return 1, "B"


#: Where a point's label goes (offset in points, alignment), first choice first; a point near one already
#: labelled takes the next free place.
_LABEL_OFFSETS = [(6, 5, "left"), (6, -12, "left"), (-6, 5, "right"), (-6, -12, "right"), (6, 15, "left"),
                  (6, -22, "left"), (-6, 15, "right"), (-6, -22, "right")]


def _short(name: str, width: int = 24) -> str:
    """A point's label: the row's name, cut at ``width`` characters (the table has it whole; name long
    inline pipelines with NAME=PIPELINE)."""
    return name if len(name) <= width else name[: width - 1] + "…"


def _label_slots(xs, ys, log: bool) -> list[int]:
    """A label place (index into :data:`_LABEL_OFFSETS`) per point, so that labels of points close together
    (within about a tenth of the plot) do not overlap: each takes the first place its near neighbours to the
    left have not."""
    import math

    if not xs:
        return []
    tx = [math.log10(x) if log else x for x in xs]
    xr = (max(tx) - min(tx)) or 1.0
    yr = (max(ys) - min(ys)) or 1.0
    order = sorted(range(len(xs)), key=lambda i: (tx[i], ys[i]))
    slots = [0] * len(xs)
    for k, i in enumerate(order):
        taken = {slots[j] for j in order[:k] if abs(tx[i] - tx[j]) / xr < 0.12 and abs(ys[i] - ys[j]) / yr < 0.1}
        slots[i] = next(n for n in range(len(xs) + 1) if n not in taken)
    return slots


def _svg_for_html(svg: str) -> str:
    """matplotlib's SVG document as an element to inline in HTML: no XML declaration, doctype, metadata
    or namespace declarations (the HTML parser puts <svg> in the SVG namespace and knows xlink:href)."""
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
    svg = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg)
    return svg.strip()


def _plot(doc: dict, key: str, cost: str, xlabel: str, title: str, scale: float, salt: str) -> str:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    rc = {"svg.hashsalt": salt, "svg.fonttype": "none", "font.size": 9, "axes.titlesize": 10,
          "font.family": "sans-serif", "svg.image_inline": True}
    if "svg.id" in matplotlib.rcParams:
        rc["svg.id"] = salt
    rows = [r for r in doc["rows"] if r["ok"] and r[cost] is not None and r["accuracy"] is not None]
    with matplotlib.rc_context(rc):
        fig = Figure(figsize=(6.2, 4.2), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        xs = [r[cost] / scale for r in rows]
        ys = [r["accuracy"] for r in rows]
        front = sorted(((x, y, r) for x, y, r in zip(xs, ys, rows) if r["pareto"][key]), key=lambda t: (t[0], t[1]))
        if len(front) > 1:
            ax.step([t[0] for t in front], [t[1] for t in front], where="post", color="#0b6e4f", alpha=0.55,
                    linewidth=1.5, zorder=1)
        log = bool(xs) and min(xs) > 0 and max(xs) / min(xs) > 8
        slots = _label_slots(xs, ys, log)
        for x, y, r, slot in zip(xs, ys, rows, slots):
            on = r["pareto"][key]
            ax.scatter([x], [y], s=60 if r["baseline"] else 46, marker="s" if r["baseline"] else "o",
                       facecolor="#0b6e4f" if on else "white", edgecolor="#0b6e4f" if on else "#777777",
                       linewidth=1.4, zorder=3)
            dx, dy, ha = _LABEL_OFFSETS[slot % len(_LABEL_OFFSETS)]
            ax.annotate(_short(r["name"]), (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha,
                        fontsize=8, color="#1d1d1f" if on else "#555555", zorder=4)
        if log:
            ax.set_xscale("log")
        if ys and max(ys) - min(ys) < 1e-9:  # every row scores the same: a band around it, not a 0-width axis
            ax.set_ylim(ys[0] - 1, ys[0] + 1)
        ax.margins(x=0.18, y=0.15)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{doc['metric']} (eval, points)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3, linewidth=0.6)
        handles = [Line2D([], [], marker="s", linestyle="", markerfacecolor="white", markeredgecolor="#555",
                          label=f"{doc['baseline']} (baseline)"),
                   Line2D([], [], marker="o", linestyle="-", color="#0b6e4f", markerfacecolor="#0b6e4f",
                          label="Pareto front"),
                   Line2D([], [], marker="o", linestyle="", markerfacecolor="white", markeredgecolor="#777",
                          label="dominated")]
        ax.legend(handles=handles, loc="best", fontsize=8, framealpha=0.85)
        fig.tight_layout()
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return _svg_for_html(buf.getvalue())


def plots_svg(doc: dict) -> dict[str, str] | None:
    """``{"size": svg, "latency": svg}`` (inline SVG elements; a plot with no point is left out); None when
    matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        return None
    ok = [r for r in doc["rows"] if r["ok"] and r["accuracy"] is not None]
    out = {}
    sizes = [r["onnx_bytes"] for r in ok if r["onnx_bytes"] is not None]
    if sizes:
        scale, unit = _bytes_unit(sizes)
        out["size"] = _plot(doc, "size", "onnx_bytes", f"optimized model size (.onnx, {unit})",
                            "Accuracy vs model size", scale, "graphopt-compare-size")
    lat = [r["latency_ms"] for r in ok if r["latency_ms"] is not None]
    if lat:
        batch = doc["timing"].get("batch")
        scale, unit = (1e-3, "µs") if max(lat) < 1 else ((1e3, "s") if max(lat) >= 1000 else (1.0, "ms"))
        out["latency"] = _plot(doc, "latency", "latency_ms",
                               f"artifact latency (median, {unit}{f'; batch {batch}' if batch else ''})",
                               "Accuracy vs latency", scale, "graphopt-compare-latency")
    return out


# --------------------------------------------------------------------------- page
def _ms(ms) -> str:
    from .compare import _fmt_ms

    return _fmt_ms(ms)


def _spec_html(spec: str) -> str:
    """Pipeline text that wraps only between passes (a pass's name and options stay on one line)."""
    from .pipeline import _split_top

    if not spec:
        return "(no passes)"
    try:
        parts = _split_top(spec, ",")
    except Exception:  # noqa: BLE001 - text that does not split is shown as it is
        parts = [spec]
    return ",<wbr>".join(f'<span class="pass">{html.escape(p)}</span>' for p in parts)


def _table(doc: dict) -> str:
    from .stats import human_bytes, human_count

    e = html.escape
    head = ["name", "pipeline", ".onnx", "weights", "FLOPs", "accuracy", "drop", "artifact acc.",
            "latency (p10–p90)", "× original", "artifact", "Pareto front"]
    cls = {0: "name", 1: "spec"}
    out = ['<div class="scroll"><table>', "<thead><tr>" + "".join(f'<th class="{cls.get(j, "")}">{e(h)}</th>'
                                             for j, h in enumerate(head)) + "</tr></thead>", "<tbody>"]
    for r in doc["rows"]:
        tr = '<tr class="baseline">' if r["baseline"] else "<tr>"
        if not r["ok"]:
            msg = r["error"]["message"] if r["error"] else "failed"
            out.append(f'{tr}<td class="name">{e(r["name"])}</td><td class="spec">{_spec_html(r["spec"])}</td>'
                       f'<td class="err" colspan="{len(head) - 2}">FAILED: {e(msg)}</td></tr>')
            continue
        front = ", ".join(k for k in ("size", "latency") if r["pareto"][k])
        lat = e(_ms(r["latency_ms"]))
        if r["latency_p10_ms"] is not None:
            lat += f"<br><small>{e(_ms(r['latency_p10_ms']))}–{e(_ms(r['latency_p90_ms']))}</small>"
        cells = [
            e(r["name"]), _spec_html(r["spec"]), human_bytes(r["onnx_bytes"]), human_bytes(r["weight_bytes"]),
            human_count(r["flops"]),
            f"{r['accuracy']:.2f}", "–" if r["accuracy_drop"] is None else f"{0.0 - r['accuracy_drop'] + 0.0:+.2f}",
            "–" if r["artifact_accuracy"] is None else f"{r['artifact_accuracy']:.2f}", lat,
            "–" if r["latency_ratio"] is None else f"{r['latency_ratio']:.2f}", human_bytes(r["artifact_bytes"]),
            f'<span class="front">{e(front)}</span>' if front else "–",
        ]
        out.append(tr + "".join(f'<td class="{cls.get(j, "")}">{c}</td>' for j, c in enumerate(cells)) + "</tr>")
    out += ["</tbody>", "</table></div>"]
    return "\n".join(out)


def render_html(doc: dict, plots: dict[str, str] | None) -> str:
    """The whole page for a compare document; ``plots`` from :func:`plots_svg` (None: matplotlib missing)."""
    e = html.escape
    t = doc["timing"]
    if t["error"] is None and t["batch"] is not None:
        timing = (f"latency: median of each artifact on batch {t['batch']} of {e(doc['data'])}, {t['threads']} "
                  f"thread(s), all artifacts timed in one run of {t['rounds']} interleaved rounds "
                  f"({t['seconds']:.1f} s)")
    else:
        timing = "latency: not measured" + (f" ({e(t['error']['message'])})" if t["error"] else "")
    target = doc["target"]["name"] + "".join(f", {k}={v}" for k, v in doc["target"]["options"].items())
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>graphopt compare: {e(doc['model'])}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
        "<h1>graphopt compare</h1>",
        f'<p class="meta">model <b>{e(doc["model"])}</b>, target <b>{e(target)}</b></p>',
        f'<p class="meta">{e(doc["metric"])} on {e(doc["eval"])} ({doc["eval_samples"]} samples); '
        f'calibration data {e(doc["data"])}</p>',
        f'<p class="meta">{timing}</p>',
        _table(doc),
        '<p class="meta">.onnx: the optimized model\'s size with every weight inline; weights: bytes of its '
        "initializers; FLOPs: estimated for one sample, nodes computed from weights alone (in-graph weight "
        "decoding) left out (a multiply-add counts 2; pruned zeros still count); "
        "accuracy: the --eval metric of the optimized graph under ONNX Runtime, drop against the original in "
        "points; artifact accuracy: the same metric of the compiled artifact; × original: latency over the "
        "original's (below 1 is faster); Pareto front: no other row is both at least as accurate and at most "
        "as large / as slow.</p>",
    ]
    if plots is None:
        parts.append(f'<p class="note">{e(NO_MATPLOTLIB)}</p>')
    elif plots:
        parts.append('<h2>Accuracy against cost</h2>')
        parts.append('<div class="plots">')
        captions = {"size": "Accuracy against the optimized model's .onnx size; filled points and the staircase: "
                            "the Pareto front (best accuracy for the size).",
                    "latency": "Accuracy against the artifact's median latency; filled points and the staircase: "
                               "the Pareto front (best accuracy for the latency)."}
        for key in ("size", "latency"):
            if key in plots:
                parts.append(f'<figure id="plot-{key}">{plots[key]}<figcaption>{e(captions[key])}</figcaption>'
                             "</figure>")
        parts.append("</div>")
    failed = [r for r in doc["rows"] if not r["ok"]]
    if doc["notes"] or failed:
        parts.append("<h2>Notes</h2>")
        parts.append("<ul>")
        for r in failed:
            parts.append(f'<li class="note">{e(r["name"])} failed: {e(r["error"]["message"] if r["error"] else "")}'
                         "</li>")
        for n in doc["notes"]:
            if n == NO_MATPLOTLIB:  # said above, where the plots would be
                continue
            parts.append(f'<li class="note">{e(n)}</li>')
        parts.append("</ul>")
    passes = [(r["name"], n) for r in doc["rows"] for n in r["notes"]]
    if passes:
        parts.append("<h2>What the passes did</h2>")
        parts.append("<ul>" + "".join(f"<li><b>{e(name)}</b>: {e(n)}</li>" for name, n in passes) + "</ul>")
    parts += [f"<footer>graphopt {e(__version__)} · compare.json beside this page holds every figure</footer>",
              "</body>", "</html>", ""]
    return "\n".join(parts)
