"""Hardening figures (issues 25 and 28): bad-input cases tried and passing, and CLI start-up time.

    python -m bench hardening [--repeats 5] [--quick]

1. Runs the bad-input tables (tests/cli/test_bad_inputs_*.py, the table in tests/cli/test_cli.py and
   the console-script tests) under pytest with a JUnit XML report and counts cases tried / passing per
   file; each case is one row (input, verb, expected exit code, message fragment, nothing left behind).
2. Times ``vitkit --help`` and ``vitkit train --help`` as whole processes (the installed console script,
   cold interpreter each run; page cache warm after the first) and checks none imports torch.

``--quick`` times each command once and skips the bad-input tables (a smoke test of the suite).
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from bench.harness import ROOT, Output, Table

QUICK = {"repeats": 1, "cases": False}


def add_arguments(p) -> None:
    p.add_argument("--repeats", type=int, default=5, help="whole-process runs of each command")
    p.add_argument("--no-cases", dest="cases", action="store_false", help="skip the bad-input tables")


def bad_input_cases() -> dict:
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests/cli").glob("test_bad_inputs_*.py"))
    targets = [
        *files,
        "tests/cli/test_cli.py::test_bad_input_is_one_line_exit_2",
        "tests/cli/test_console_script.py",
    ]
    with tempfile.TemporaryDirectory() as d:
        xml = Path(d) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *targets]
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        per_file: dict[str, dict[str, int]] = {}
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = case.get("classname", "").split(".")[-1] or "?"
            row = per_file.setdefault(name, {"tried": 0, "passed": 0, "skipped": 0})
            row["tried"] += 1
            if case.find("skipped") is not None:
                row["skipped"] += 1
            elif case.find("failure") is None and case.find("error") is None:
                row["passed"] += 1
    total = {k: sum(r[k] for r in per_file.values()) for k in ("tried", "passed", "skipped")}
    return {"per_file": per_file, "total": total, "seconds": round(seconds, 1)}


def help_times(repeats: int) -> dict:
    script = Path(sys.executable).with_name("vitkit")
    exe = str(script) if script.is_file() else shutil.which("vitkit")
    out = {}
    for argv in (["--help"], ["train", "--help"], ["quantize", "--help"]):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            proc = subprocess.run([exe, *argv], capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            assert proc.returncode == 0, proc.stderr
        out["vitkit " + " ".join(argv)] = {
            "min_s": round(min(times), 3),
            "median_s": round(statistics.median(times), 3),
            "max_s": round(max(times), 3),
        }
    probe = (
        "import sys; from vitkit.cli import main; main(['train', '--help']); print('torch' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    out["imports_torch"] = res.stdout.strip().splitlines()[-1] == "True"
    return out


def run(args) -> Output:
    help_rows = help_times(args.repeats)
    imports_torch = help_rows.pop("imports_torch")
    records = [{"table": "help", "command": cmd, **r} for cmd, r in help_rows.items()]
    tables = []
    if args.cases:
        cases = bad_input_cases()
        records += [{"table": "cases", "file": name, **r} for name, r in sorted(cases["per_file"].items())]
        records.append({"table": "cases", "file": "**all**", **cases["total"]})
        tables.append(
            Table(
                name="cases",
                columns=[
                    ("bad-input table", "{file}"),
                    ("cases tried", "{tried}"),
                    ("passing", "{passed}"),
                    ("skipped", "{skipped}"),
                ],
            )
        )
    tables.append(
        Table(
            name="help",
            columns=[
                ("command (whole process)", "`{command}`"),
                ("min s", "{min_s:.2f}"),
                ("median s", "{median_s:.2f}"),
                ("max s", "{max_s:.2f}"),
            ],
        )
    )
    notes = [
        f"`--help` imports torch: {'yes (a regression)' if imports_torch else 'no'}. Goal: under 2 s (was 23 s "
        "cold on a loaded machine, ~4 s idle, before the lazy imports). Each command is a whole process "
        "(the installed console script, cold interpreter; page cache warm after the first run)."
    ]
    return Output(records=records, tables=tables, notes=notes, extra={"imports_torch": imports_torch})
