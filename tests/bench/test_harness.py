"""The bench harness (bench/harness.py): machine facts, rendering, section replacement, the CLI.

Only bench.harness is imported here (standard library + vitkit.io): the suites' heavy modules load in
subprocesses, so collecting this file costs nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # bench/ is a folder of the checkout, not an installed package

from bench import harness  # noqa: E402

CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: Some Other CPU
flags\t\t: fpu sse
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_cpuinfo_parser_reads_model_and_the_flags_that_matter():
    facts = harness.parse_cpuinfo(CPUINFO)
    assert facts == {
        "cpu": "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz",
        # in WANTED_FLAGS order, only those present, from the first processor
        "flags": ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"],
    }
    assert harness.parse_cpuinfo("model name : AMD EPYC\nflags : sse avx2\n") == {
        "cpu": "AMD EPYC",
        "flags": ["avx2"],
    }
    assert harness.parse_cpuinfo("") == {"cpu": "", "flags": []}


def test_machine_facts_name_the_cpu_versions_and_commit_without_importing_torch():
    facts = harness.machine_facts(CPUINFO)
    assert facts["cpu"].startswith("Intel(R) Xeon(R)") and "amx_bf16" in facts["flags"]
    assert facts["cores"] >= 1 and facts["usable_cores"] >= 1
    assert set(harness.VERSIONED) <= set(facts["versions"])
    assert facts["versions"]["torch"]  # read from the package metadata
    assert facts["date"].endswith("UTC")
    probe = "import sys; from bench import harness; harness.machine_facts(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=_env(), cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr


SAMPLE = {
    "schema": 1,
    "suite": "demo-suite",
    "description": "a sample",
    "quick": False,
    "command": "python -m bench demo-suite --repeats 3",
    "options": {"repeats": 3},
    "machine": {
        "cpu": "Test CPU",
        "flags": ["avx2", "amx_bf16"],
        "cores": 4,
        "usable_cores": 2,
        "os": "Linux",
        "python": "3.11.7",
        "versions": {
            "torch": "2.14.1",
            "timm": "1.0.31",
            "onnxruntime": None,
            "numpy": "2.0",
            "vitkit": "0.1.0",
        },
        "commit": "abcdef123456",
        "date": "2026-12-06 10:00 UTC",
    },
    "load_before": [0.1, 0.2, 0.3],
    "load_after": [0.5, 0.25, 0.3],
    "seconds": 12.3,
    "notes": ["Two rows."],
    "tables": [
        {
            "name": "speed",
            "title": "Speed",
            "columns": [
                ["model", "{model}"],
                ["ratio (spread)", "{ratio:.2f}x ({ratio_min:.2f}-{ratio_max:.2f})"],
                ["top-1", "{top1:.1%}"],
            ],
        },
        {"name": None, "title": "", "columns": [["model", "`{model}`"]]},
    ],
    "records": [
        {"table": "speed", "model": "base", "ratio": 1.0, "ratio_min": 1.0, "ratio_max": 1.0, "top1": 0.9512},
        {"table": "speed", "model": "a|b", "ratio": 1.456, "ratio_min": 1.3, "ratio_max": 1.5, "top1": None},
    ],
    "extra": {},
}

EXPECTED = """\
<!-- demo-suite:begin -->
## demo-suite: a sample

2026-12-06 10:00 UTC; Test CPU, 4 cores (2 usable), flags avx2, amx_bf16; Python 3.11.7, torch 2.14.1, \
timm 1.0.31, numpy 2.0, vitkit 0.1.0; commit abcdef123456.
Command: `python -m bench demo-suite --repeats 3` (12 s); load average (1/5/15 min) 0.10/0.20/0.30 before, \
0.50/0.25/0.30 after.

Two rows.

**Speed**

| model | ratio (spread) | top-1 |
|---|---|---|
| base | 1.00x (1.00-1.00) | 95.1% |
| a\\|b | 1.46x (1.30-1.50) | - |

| model |
|---|
| `base` |
| `a\\|b` |

<!-- demo-suite:end -->
"""


def test_render_section_from_json_is_exact_markdown():
    assert harness.render_section(SAMPLE) == EXPECTED
    quick = harness.render_section({**SAMPLE, "quick": True})
    assert "**Quick smoke run (--quick): not a result.**" in quick
    loaded = harness.render_section({**SAMPLE, "load_before": [2.5, 1.0, 1.0]})  # 2 usable cores
    assert "**Loaded machine: 1-minute load 2.50 before the run, above its 2 usable cores" in loaded


@pytest.mark.parametrize(
    ("template", "record", "cell"),
    [
        ("{x:.2f}", {"x": 1.234}, "1.23"),
        ("{x:.2f}", {"x": None}, "-"),  # a missing measurement
        ("{x:.2f} ({lo:.1f})", {"x": 1.0}, "-"),  # one field of several missing
        ("{x:.2f}", {"x": "text"}, "-"),  # a value the format cannot take
        ("{n:,}", {"n": 1234567}, "1,234,567"),
        ("W{b}A{b}", {"b": 8}, "W8A8"),
    ],
)
def test_cells_format_or_show_a_dash(template, record, cell):
    assert harness.format_cell(template, record) == cell


def test_replacing_a_section_keeps_the_rest_of_the_file_byte_identical():
    before = "# Title\r\n\nhand text  \n\n<!-- other:begin -->\nother\n<!-- other:end -->\n\ntail\n"
    old = "<!-- demo-suite:begin -->\nold\n<!-- demo-suite:end -->\n"
    text = before + old + "after\n\n"
    new = harness.replace_section(text, "demo-suite", EXPECTED)
    assert new == before + EXPECTED + "after\n\n"
    # replacing again is stable, and another suite's block is untouched
    assert harness.replace_section(new, "demo-suite", EXPECTED) == new
    # an absent section is appended after one blank line
    assert harness.replace_section("x\n", "demo-suite", EXPECTED) == "x\n\n" + EXPECTED


def test_render_all_uses_real_json_and_placeholders_for_the_rest(tmp_path):
    real = {**SAMPLE, "suite": "hardening"}
    (tmp_path / "hardening.json").write_text(json.dumps(real))
    (tmp_path / "deploy.json").write_text(json.dumps({**SAMPLE, "suite": "deploy", "quick": True}))
    text = harness.render_all(tmp_path)
    assert text.startswith(harness.HEADER)
    assert harness.render_section(real) in text
    # a quick run is not a result: its suite keeps the placeholder
    assert "Not yet run with the harness: `python -m bench deploy`." in text
    assert "Not yet run with the harness: `python -m bench quant-deploy --run RUN_DIR`." in text
    for s in harness.SUITES:
        assert text.count(harness.begin_marker(s.name)) == 1


def test_committed_results_md_is_what_render_makes():
    """bench/RESULTS.md is generated: it equals a fresh rendering of bench/results/*.json."""
    assert (ROOT / "bench/RESULTS.md").read_text() == harness.render_all(harness.RESULTS_DIR)


def test_list_names_every_suite_and_check_imports_them():
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--list"], capture_output=True, text=True, env=_env(), cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    names = [line.split()[0] for line in out.stdout.splitlines()]
    assert names == [s.name for s in harness.SUITES]
    assert len(set(names)) == len(names)
    modules = {p.stem for p in (ROOT / "bench").glob("*.py")} - {"__init__", "__main__", "harness"}
    assert modules == {s.module.split(".")[1] for s in harness.SUITES}  # every script is a suite
    # every suite's module imports, its function exists, its QUICK names real options
    check = subprocess.run(
        [sys.executable, "-m", "bench", "--check"], capture_output=True, text=True, env=_env(), cwd=ROOT
    )
    assert check.returncode == 0, check.stdout + check.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "bench", "no-such-suite"], capture_output=True, text=True, env=_env(), cwd=ROOT
    )
    assert bad.returncode != 0 and "unknown suite 'no-such-suite'" in bad.stderr


def test_hardening_suite_runs_end_to_end_in_quick_mode(tmp_path):
    out_json, results = tmp_path / "hardening.json", tmp_path / "RESULTS.md"
    results.write_text("# kept\n")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "hardening",
            "--quick",
            "--json",
            str(out_json),
            "--results",
            str(results),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert time.perf_counter() - t0 < 60
    doc = json.loads(out_json.read_text())
    assert doc["suite"] == "hardening" and doc["quick"] is True
    assert doc["options"]["repeats"] == 1 and doc["options"]["cases"] is False  # QUICK applied
    assert len(doc["load_before"]) == 3 and len(doc["load_after"]) == 3
    assert doc["machine"]["cpu"] and doc["machine"]["versions"]["torch"]
    commands = {r["command"] for r in doc["records"] if r["table"] == "help"}
    assert commands == {"vitkit --help", "vitkit train --help", "vitkit quantize --help"}
    for r in doc["records"]:
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"] < 30
    assert doc["extra"]["imports_torch"] is False  # issue 18 part 8: --help imports no torch
    text = results.read_text()
    assert text.startswith("# kept\n\n") and text.endswith(harness.render_section(doc))
    assert "not a result" in text
