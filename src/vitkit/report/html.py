"""The HTML report page (``vitkit report``, collected by :mod:`vitkit.stages.report`): one self-contained page (images embedded as base64 PNG) over run directories.

Sections, each present only when the run has the data: a summary table across runs (datasets that
differ from the first run's are flagged), the accuracy vs latency vs size Pareto plot (from
``bench.json``), and per run: lineage (base model and transforms from the manifest, in order),
training curves (``history.csv``), metrics (incl. per-class and many/medium/few-shot), the confusion
matrix, export (``export.json``), bench (``bench.json``), and the analysis results that
``vitkit attack`` / ``similarity`` / ``attention`` write into sub-directories of the run
(``*/attack.json``, ``*/similarity.json``, ``*/attention.json`` with their PNGs, and
``*/tokens.json`` + PNG: the kept / merged patches of EViT / ToMe runs).
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitkit.errors import VitkitError

SECTION_IDS = ("summary", "pareto", "lineage", "curves", "metrics", "confusion", "export", "bench",
               "robustness", "similarity", "attention", "tokens")  # fmt: skip


@dataclass
class RunData:
    path: Path
    label: str
    model: str
    transforms: list[dict[str, Any]]
    data: str
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, str]] = field(default_factory=list)
    export: dict[str, Any] | None = None
    bench: dict[str, Any] | None = None
    analyses: dict[str, list[tuple[Path, dict[str, Any]]]] = field(default_factory=dict)
    #: the run's task: its quality metric (summary column, curves) and the metrics its table leads with
    quality_key: str = "top1"
    metric_keys: tuple[str, ...] = ()
    #: figures the task wrote into the run (title, PNG), e.g. segmentation overlays
    figures: list[tuple[str, Path]] = field(default_factory=list)
    head: dict[str, Any] | None = None  # a dense model's head (model.json "head")


# -- figures ----------------------------------------------------------------------------------------
def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves_png(history: list[dict[str, str]], quality_key: str = "top1") -> str | None:
    def col(name: str) -> list[float]:
        return [float(r[name]) for r in history if r.get(name) not in (None, "")]

    if not history or "epoch" not in history[0]:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    ep = col("epoch")
    for key in ("train_loss", "val_loss"):
        v = col(key) if key in history[0] else []
        if len(v) == len(ep):
            axes[0].plot(ep, v, label=key)
    # objectives that validate on their own (e.g. ViT-P's point accuracy) log their own keys
    for key in dict.fromkeys(
        (f"val_{quality_key}", "val_top1", "val_balanced_accuracy", "val_point_accuracy")
    ):
        v = col(key) if key in history[0] else []
        if len(v) == len(ep):
            axes[1].plot(ep, v, label=key)
    for ax in axes:
        ax.set_xlabel("epoch")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    return _png(fig)


def confusion_png(cm: list[list[int]], classes: list[str]) -> str:
    import numpy as np

    plt = _plt()
    m = np.asarray(cm, dtype=float)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    n = len(m)
    fig, ax = plt.subplots(figsize=(max(3.5, 0.4 * n + 1.5), max(3, 0.4 * n + 1)))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), [str(c)[:10] for c in classes[:n]], rotation=60, fontsize=7)
    ax.set_yticks(range(n), [str(c)[:10] for c in classes[:n]], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    return _png(fig)


def per_class_png(acc: list[float], classes: list[str]) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4, 0.3 * len(acc) + 1), 2.6))
    ax.bar(range(len(acc)), acc, color="tab:green")
    ax.set_xticks(range(len(acc)), [str(c)[:10] for c in classes[: len(acc)]], rotation=60, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    fig.tight_layout()
    return _png(fig)


def pareto_points(runs: list[RunData]) -> list[dict[str, Any]]:
    """One point per (run, runtime) with bench results: accuracy, batch-1 latency, parameters."""
    pts = []
    for r in runs:
        if not r.bench:
            continue
        for name, b in r.bench["results"].items():
            if name.startswith("timm"):
                continue  # the baseline has the run's weights only where shapes fit: no accuracy
            acc = r.metrics.get("top1")
            size = 4 * b["parameters"]  # fp32 weights
            if r.export and name == "onnxruntime fp32":
                size = r.export.get("size_bytes") or size
            if r.export and name == "onnxruntime int8" and r.export.get("int8"):
                acc = r.export["int8"].get("top1") or acc
                size = r.export["int8"].get("size_bytes") or size
            if acc is None:
                continue
            pts.append({"label": f"{r.label} · {name}", "accuracy": acc, "latency_ms": b["latency_ms_p50"],
                        "parameters": b["parameters"], "size_mb": size / 1e6})  # fmt: skip
    return pts


def pareto_front(pts: list[dict[str, Any]]) -> list[int]:
    """Indices of points no other point beats on both accuracy (higher) and latency (lower)."""
    front = []
    for i, p in enumerate(pts):
        dominated = any(
            q["accuracy"] >= p["accuracy"]
            and q["latency_ms"] <= p["latency_ms"]
            and (q["accuracy"] > p["accuracy"] or q["latency_ms"] < p["latency_ms"])
            for q in pts
        )
        if not dominated:
            front.append(i)
    return front


def pareto_png(pts: list[dict[str, Any]]) -> str:
    plt = _plt()
    front = set(pareto_front(pts))
    fig, ax = plt.subplots(figsize=(7, 4))
    biggest = max(p["size_mb"] for p in pts) or 1
    for i, p in enumerate(pts):
        ax.scatter(p["latency_ms"], p["accuracy"], s=30 + 400 * p["size_mb"] / biggest,
                   color="tab:red" if i in front else "tab:gray", alpha=0.6)  # fmt: skip
        ax.annotate(f"{p['label']} ({p['size_mb']:.2f} MB)", (p["latency_ms"], p["accuracy"]), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("latency, batch 1, p50 (ms, log)")
    ax.set_ylabel("top-1")
    ax.set_title("accuracy vs latency (marker area ∝ model size in MB; red: Pareto front)", fontsize=9)
    fig.tight_layout()
    return _png(fig)


# -- HTML -------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if v is None:  # a size or ratio that was not measured (no export.json, no timm baseline)
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, float) for x in v):
        return f"{v[0]:.4g}–{v[1]:.4g}"
    return html.escape(str(v))


def _table(header: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _scalars(doc: dict[str, Any]) -> list[list[Any]]:
    return [[k, v] for k, v in doc.items() if isinstance(v, (int, float, str, bool)) or v is None]


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h3>{html.escape(title)}</h3>{body}</section>'


def _run_sections(r: RunData) -> str:
    out = []
    lineage = [[0, "base", r.model, ""]]
    if r.head:
        cfg = {k: v for k, v in r.head.items() if k not in ("head", "task")}
        lineage.append([1, f"{r.head.get('task', '')} head", r.head.get("head", ""),
                        ", ".join(f"{k}={v}" for k, v in cfg.items())])  # fmt: skip
    lineage += [
        [len(lineage) + i, "transform", t["name"], ", ".join(f"{k}={v}" for k, v in t["config"].items())]
        for i, t in enumerate(r.transforms)
    ]
    out.append(_section(f"lineage-{r.label}", "lineage", _table(["#", "step", "name", "config"], lineage)))
    curves = curves_png(r.history, r.quality_key)
    if curves:
        out.append(_section(f"curves-{r.label}", "training curves", _img(curves, "training curves")))
    m = r.metrics
    if m:
        keys = dict.fromkeys((*r.metric_keys, "top1", "top5", "balanced_accuracy", "macro_f1", "ece",
                              "many_shot_accuracy", "medium_shot_accuracy", "few_shot_accuracy", "mean_auroc",
                              "mAP", "parameters", "n"))  # fmt: skip
        body = _table(["metric", "value"], [[k, m[k]] for k in keys if m.get(k) is not None])
        if m.get("per_class_accuracy"):
            body += _img(per_class_png(m["per_class_accuracy"], m.get("classes", [])), "per-class accuracy")
        out.append(_section(f"metrics-{r.label}", "metrics", body))
        if m.get("confusion_matrix"):
            png = confusion_png(m["confusion_matrix"], m.get("classes", []))
            out.append(_section(f"confusion-{r.label}", "confusion matrix", _img(png, "confusion matrix")))
    for title, png_path in r.figures:
        if png_path.is_file():
            png = base64.b64encode(png_path.read_bytes()).decode()
            out.append(_section(f"{png_path.stem}-{r.label}", title, _img(png, title)))
    if r.export:
        rows = _scalars(r.export) + [[f"int8 {k}", v] for k, v in (r.export.get("int8") or {}).items()]
        out.append(_section(f"export-{r.label}", "export (ONNX)", _table(["field", "value"], rows)))
    if r.bench:
        rows = [[n, b["latency_ms_p50"], b["latency_ms_p90"], b["throughput"], b["throughput_spread"],
                 b.get("throughput_vs_timm"), b.get("peak_memory_mb"), b["parameters"], b["flops"]]
                for n, b in r.bench["results"].items()]  # fmt: skip
        cfg = r.bench["config"]
        load = r.bench.get("load")
        load_text = f"{load:.2f}" if isinstance(load, (int, float)) else "not recorded"
        note = (f"<p>{cfg['threads']} threads, median of {cfg['repeats']} rounds, throughput at batch "
                f"{cfg['throughput_batch']}; load average {load_text}</p>")  # fmt: skip
        header = ["runtime", "lat p50 ms", "lat p90 ms", "img/s", "spread", "vs timm", "peak MB",
                  "params", "FLOPs"]  # fmt: skip
        out.append(_section(f"bench-{r.label}", "bench", note + _table(header, rows)))
    titles = {"attack": "robustness", "similarity": "similarity (CKA)", "attention": "attention",
              "tokens": "tokens kept / merged (EViT, ToMe)"}  # fmt: skip
    for kind, docs in r.analyses.items():
        body = ""
        for path, doc in docs:
            body += f"<h4>{html.escape(path.parent.name)}</h4>"
            rows = _scalars(doc)
            for res in doc.get("results", []) if isinstance(doc.get("results"), list) else []:
                rows += [[f"{res.get('method', '')} {k}", v] for k, v in _scalars(res)]
            if rows and kind not in ("attention", "tokens"):
                body += _table(["field", "value"], rows)
            png = path.with_suffix(".png")
            if png.is_file():
                body += _img(base64.b64encode(png.read_bytes()).decode(), f"{kind} {path.parent.name}")
        out.append(_section(f"{titles[kind].split()[0]}-{r.label}", titles[kind], body))
    return f'<article class="run"><h2>{html.escape(r.label)}</h2>{"".join(out)}</article>'


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;
margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px;text-align:right}
td:first-child,th:first-child{text-align:left}.flag{color:#b00;font-weight:bold}img{max-width:100%}"""


def _quality(d: RunData) -> Any:
    v = d.metrics.get(d.quality_key)
    return v if v is None or d.quality_key == "top1" else f"{d.quality_key} {v:.4f}"


def render_report(data: list[RunData], title: str = "vitkit report") -> tuple[str, list[str]]:
    """The HTML text and the warnings (e.g. runs on different datasets) for these runs' data."""
    if not data:
        raise VitkitError("report: give at least one run directory")
    labels = [d.label for d in data]
    for d in data:  # two runs with the same directory name: use the path to tell them apart
        if labels.count(d.label) > 1:
            d.label = str(d.path).strip("/").replace("/", "_")
    ref = data[0].data
    warnings = [
        f"run '{d.path}' was trained on '{d.data}', not '{ref}' like '{data[0].path}': "
        "accuracies are not comparable"
        for d in data
        if d.data != ref
    ]
    rows = []
    for d in data:
        best = None
        if d.bench:
            best = min(d.bench["results"].items(), key=lambda kv: kv[1]["latency_ms_p50"])
        rows.append([
            d.label, d.model, " → ".join(t["name"] for t in d.transforms) or "—",
            d.data + (" ⚠ differs" if d.data != ref else ""), _quality(d),
            d.metrics.get("parameters"),
            (d.export or {}).get("size_bytes"), ((d.export or {}).get("int8") or {}).get("size_bytes"),
            f"{best[0]}: {best[1]['latency_ms_p50']:.3g}" if best else "",
        ])  # fmt: skip
    same = len({d.quality_key for d in data}) == 1
    quality = ("top-1" if data[0].quality_key == "top1" else data[0].quality_key) if same else "quality"
    header = ["run", "model", "transforms", "data", quality, "params", "onnx bytes", "int8 bytes",
              "fastest runtime: ms"]  # fmt: skip
    summary = _table(header, rows, cls="summary")
    if warnings:
        summary += "".join(f'<p class="flag">⚠ {html.escape(w)}</p>' for w in warnings)
    parts = [_section("summary", "summary", summary)]
    pts = pareto_points(data)
    if pts:
        parts.append(_section("pareto", "accuracy vs latency vs size", _img(pareto_png(pts), "pareto")))
    else:
        parts.append(_section("pareto", "accuracy vs latency vs size",
                              "<p>no bench.json in these runs: run <code>vitkit bench</code> first</p>"))  # fmt: skip
    parts += [_run_sections(d) for d in data]
    doc = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
           f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{''.join(parts)}</body></html>")  # fmt: skip
    return doc, warnings
