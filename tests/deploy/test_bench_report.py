"""Benchmarking a run in every runtime, and the self-contained HTML report."""

from __future__ import annotations

import base64
import io
import shutil
from html.parser import HTMLParser

import pytest
import torch

from vitkit.cli import main
from vitkit.deploy import BenchConfig, count_flops
from vitkit.io import write_json
from vitkit.models import model_input_size
from vitkit.report.html import SECTION_IDS, pareto_front
from vitkit.runs import load
from vitkit.stages.bench import BASELINE, BF16_BASELINE, bench_run, plot_bench
from vitkit.stages.report import build_report

TINY = BenchConfig(threads=1, repeats=2, warmup=1, latency_calls=2, throughput_batch=8)


@pytest.fixture(scope="module")
def benched_run(exported_run):
    doc = bench_run(exported_run, TINY, bf16=True)
    write_json(exported_run / "bench.json", doc)
    plot_bench(doc, exported_run / "bench.png")
    return exported_run, doc


def test_bench_run_times_every_runtime_against_timm(benched_run):
    run, doc = benched_run
    res = doc["results"]
    assert list(res) == ["vitkit fp32 eager", "vitkit bf16 eager", "onnxruntime fp32",
                         "onnxruntime int8", "openvino fp32", BASELINE, BF16_BASELINE]  # fmt: skip
    model = load(run)
    flops = count_flops(model, torch.zeros(1, *model_input_size(model)))
    for r in res.values():
        assert r["flops"] == flops > 0 and r["parameters"] == 205_002
        assert (
            r["throughput"] > 0 and r["throughput_spread"][0] <= r["throughput"] <= r["throughput_spread"][1]
        )
        assert r["latency_ms_p50"] <= r["latency_ms_p90"] and len(r["throughput_rounds"]) == 2
        assert r["peak_memory_mb"] > 0  # was 0.0 once warm-up had left the memory resident
        assert r["throughput_vs_timm"] == pytest.approx(r["throughput"] / res[BASELINE]["throughput"])
        assert r["throughput_vs_timm_bf16"] == pytest.approx(
            r["throughput"] / res[BF16_BASELINE]["throughput"]
        )
    assert doc["torch_threads"] == 1 and doc["config"]["repeats"] == 2
    assert (run / "bench.png").stat().st_size > 1000


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.ids, self.tables = [], set(), 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"])
        if "id" in a:
            self.ids.add(a["id"].split("-")[0])
        self.tables += tag == "table"


def test_report_is_self_contained_with_every_section(benched_run, tmp_path):
    from PIL import Image

    run, _ = benched_run
    # analysis results as issue 7's verbs write them: RUN/<analysis>/<kind>.json + .png
    for sub, kind, doc in [
        ("attack-pgd", "attack", {"data": "digits", "results": [{"method": "pgd", "clean_accuracy": 0.9,
                                                                  "robust_accuracy": 0.1}]}),
        ("similarity-self", "similarity", {"model_a": "a", "model_b": "b", "mean_diagonal": 1.0}),
        ("attention", "attention", {"layers": [-1]}),
        ("attention", "tokens", {"blocks": [{"block": 1, "kind": "keep"}]}),
    ]:  # fmt: skip
        (run / sub).mkdir(exist_ok=True)
        write_json(run / sub / f"{kind}.json", doc)
        shutil.copy(run / "bench.png", run / sub / f"{kind}.png")
    other = tmp_path / "other"
    shutil.copytree(run, other)
    mj = (other / "model.json").read_text().replace('"uri": "digits"', '"uri": "fashion-mnist"')
    (other / "model.json").write_text(mj)

    text, warnings = build_report([run, other])
    assert len(warnings) == 1 and "fashion-mnist" in warnings[0] and "not comparable" in warnings[0]
    p = _Images()
    p.feed(text)
    assert set(SECTION_IDS) <= p.ids, set(SECTION_IDS) - p.ids
    assert "http" not in "".join(p.images)  # nothing fetched: every image is embedded
    # 2 runs x (curves, per-class, confusion, bench? no: 4 analyses) + pareto
    assert len(p.images) == 1 + 2 * 7
    for src in p.images:
        assert src.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        img.load()
        assert img.size[0] > 50 and img.size[1] > 50
    assert "⚠ differs" in text and "robust_accuracy" in text and "max_abs_logit_diff" in text


def test_pareto_front():
    pts = [dict(accuracy=a, latency_ms=lat, parameters=1) for a, lat in
           [(0.9, 10), (0.95, 20), (0.85, 5), (0.8, 30), (0.9, 12)]]  # fmt: skip
    assert pareto_front(pts) == [0, 1, 2]


def test_report_cli_bad_run_is_one_line(tmp_path, capsys):
    code = main(["report", str(tmp_path / "nope"), "-o", str(tmp_path / "r.html")])
    out = capsys.readouterr()
    assert code == 2 and "does not exist" in out.out + out.err and not (tmp_path / "r.html").exists()


def test_bench_table_in_a_pipe_keeps_every_column(exported_run, tmp_path):
    """Off a terminal rich assumed 80 columns and cut the 10-column table; a pipe must get it whole."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    shutil.copytree(exported_run, run)
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run(
        [sys.executable, "-m", "vitkit", "bench", str(run), "--threads", "1", "--repeats", "1",
         "--latency-calls", "1", "--batch", "4", "--no-onnx", "--no-save"],
        capture_output=True, text=True, env=env, timeout=300, check=True,
    ).stderr  # fmt: skip
    header = next(line for line in out.splitlines() if "runtime" in line)
    cols = ["run", "runtime", "params", "MFLOPs/img", "lat p50 ms", "lat p90 ms", "img/s @4", "spread",
            "vs timm", "peak MB"]  # fmt: skip
    assert all(f" {c} " in header for c in cols), header
    rows = [line for line in out.splitlines() if "eager" in line]
    assert any("vitkit fp32 eager" in r for r in rows) and any("timm fp32 eager" in r for r in rows), out
    assert "…" not in out
