"""Issue 25 item 8: the report shows a dash for what was not measured and a readable load average."""

from __future__ import annotations

from pathlib import Path

from vitkit.report.html import RunData, _run_sections, _table


def _bench(load):
    row = {"latency_ms_p50": 1.5, "latency_ms_p90": 1.7, "throughput": 900.0, "throughput_spread": [880.0, 910.0],
           "throughput_vs_timm": None, "peak_memory_mb": None, "parameters": 1000, "flops": 2000}  # fmt: skip
    return {
        "config": {"threads": 2, "repeats": 5, "throughput_batch": 64},
        "load": load,
        "results": {"eager": row},
    }


def test_missing_values_are_a_dash_not_none():
    html = _table(["run", "onnx bytes", "int8 bytes"], [["a", None, 1234]])
    assert "None" not in html and "<td>—</td>" in html and "<td>1234</td>" in html


def test_bench_section_rounds_the_load_average_and_dashes_missing_numbers():
    r = RunData(Path("r"), "r", "vitkit_nano_p4_16", [], "digits", bench=_bench(0.123456789))
    html = _run_sections(r)
    assert "load average 0.12</p>" in html
    assert "None" not in html
    r.bench = _bench(None)
    assert "load average not recorded" in _run_sections(r)
