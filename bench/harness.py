"""The one bench harness: machine facts, suite registry, JSON output and the generated RESULTS.md.

    python -m bench --list                      # every suite and what it measures
    python -m bench NAME [--quick] [options]    # run one suite: bench/results/NAME.json + its RESULTS.md section
    python -m bench NAME --help                 # the suite's own options
    python -m bench render                      # re-render bench/RESULTS.md from bench/results/*.json (no timing)

A suite is a line in ``SUITES`` (name, description, "module:function") plus, in that module, the
function ``fn(args) -> Output`` and optionally ``add_arguments(parser)`` and ``QUICK`` (option values
for ``--quick``). Output holds flat result records and the table specs that show them; the table specs
travel inside the JSON, so rendering needs only the JSON file, never the suite's (heavy) code.

This module imports only the standard library and ``vitkit.io`` (atomic writes): ``--list`` and ``render``
must not pay for torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shlex
import string
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from vitkit.io import write_text

ROOT = Path(__file__).resolve().parent.parent
# Results (committed): one JSON per suite, the source of RESULTS.md. Scratch (git-ignored): --quick
# output, partial results of long suites, cached trained runs, plots.
RESULTS_DIR = ROOT / "bench" / "results"
OUT_DIR = ROOT / "bench" / "out"
RESULTS = ROOT / "bench" / "RESULTS.md"
SCHEMA = 1

# The flags that decide which kernels run fast (bf16 is only fast with AMX / AVX512-BF16; INT8 with VNNI).
WANTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
VERSIONED = ("torch", "timm", "onnxruntime", "numpy", "vitkit")


# -- suites ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    target: str  # "module:function"; imported only when the suite runs
    needs: str = ""  # required options, shown in the placeholder's command (e.g. "--run RUN_DIR")

    @property
    def command(self) -> str:
        return f"python -m bench {self.name}" + (f" {self.needs}" if self.needs else "")

    @property
    def module(self) -> str:
        return self.target.split(":")[0]


SUITES: tuple[Suite, ...] = (
    Suite("hardening", "bad-input cases tried and passing; CLI start-up time", "bench.hardening:run"),
    Suite(
        "foundation", "vitkit fit vs a bare loop, vitkit.load vs timm, bf16 vs fp32", "bench.foundation:run"
    ),
    Suite("deploy", "timm eager fp32/bf16 vs onnxruntime fp32/int8; ONNX parity", "bench.deploy:run"),
    Suite(
        "quant-deploy",
        "real INT8 engines (ORT QDQ, PT2E Inductor) vs fp32/bf16",
        "bench.quant_deploy:run",
        "--run RUN_DIR",
    ),
    Suite(
        "quantization",
        "PTQ methods: top-1 vs FP32 over seeds, quantizer MSE",
        "bench.quantization:run",
        "--run RUN_DIR",
    ),
    Suite(
        "quant-vits14",
        "PTQ of the pretrained ViT-S/14 (linear probe on Fashion-MNIST)",
        "bench.quant_vits14:run",
    ),
    Suite(
        "compress-deit",
        "token reduction, RePaViT, pruning on deit_small (random init)",
        "bench.compress:deit",
    ),
    Suite(
        "compress-demo",
        "token reduction and pruning on the demo model, accuracy and speed",
        "bench.compress:demo",
    ),
    Suite(
        "compress-tokens",
        "EViT / ToMe on a trained run, off the shelf and fine-tuned",
        "bench.compress:tokens",
        "--source RUN_DIR",
    ),
    Suite(
        "compress-exits", "LGViT early exits: accuracy vs executed blocks and latency", "bench.compress:exits"
    ),
    Suite(
        "compress-repavit",
        "RePaViT: FFN speed-up and accuracy vs the same-size baseline",
        "bench.compress:repavit",
    ),
    Suite(
        "compress-linear",
        "L2ViT linear attention vs softmax attention by token count",
        "bench.compress:linear",
    ),
    Suite(
        "tokens-vits14",
        "EViT / ToMe on the pretrained ViT-S/14: probe accuracy and speed",
        "bench.tokens_vits14:run",
    ),
    Suite(
        "smalldata-accuracy",
        "small-data ViTs vs a matched plain ViT: top-1 over seeds",
        "bench.smalldata:accuracy",
    ),
    Suite(
        "smalldata-throughput",
        "small-data ViT variants: throughput vs the plain ViT",
        "bench.smalldata:throughput",
    ),
    Suite(
        "arch-hyena",
        "Hyena N-D vs a plain ViT on Fashion-MNIST: top-1 at 1x / 2x resolution, mixer cost growth in tokens",
        "bench.arch_hyena:run",
    ),
    Suite(
        "smalldata-rank", "As-ViT complexity rank vs trained accuracy (Kendall tau)", "bench.smalldata:rank"
    ),
    Suite("mae-peft", "MAE pre-training, PEFT methods and ExPLoRA: accuracy and cost", "bench.mae_peft:run"),
    Suite("distill-lt", "long-tail distillation (CIFAR-10-LT): students vs teacher", "bench.distill_lt:lt"),
    Suite("distill-feature", "feature distillation from a ViT teacher: students", "bench.distill_lt:feature"),
    Suite("analysis-attacks", "FGSM / PGD robust accuracy of the digits ViT", "bench.analysis:attacks"),
    Suite("analysis-patches", "patch robustness: ViT vs a CNN at the same input", "bench.analysis:patches"),
    Suite("analysis-dta", "downstream transfer attack (4-block ViT)", "bench.analysis:dta"),
    Suite(
        "analysis-dta-deep", "downstream transfer attack (12-block ViT, per-block)", "bench.analysis:dta_deep"
    ),
    Suite(
        "analysis-tokens", "EViT / ToMe token views: kept vs fused patch intensity", "bench.analysis:tokens"
    ),
    Suite("analysis-cka", "CKA / RSA between seeds and vs random init", "bench.analysis:cka"),
    Suite(
        "analysis-artifacts", "DVT position artifacts of the pretrained ViT-S/14", "bench.analysis:artifacts"
    ),
    Suite("analysis-s2", "S2 multi-scale linear probe", "bench.analysis:s2"),
    Suite("analysis-mil", "attention MIL on synthetic bags", "bench.analysis:mil"),
    Suite(
        "dense-seg",
        "canvas segmentation: linear vs UperNet head; W8A8 mIoU drop; ONNX parity",
        "bench.dense:seg",
    ),
    Suite(
        "dense-change",
        "canvas change detection: siamese ViT baseline vs change heads (F1)",
        "bench.dense:change",
    ),
    Suite(
        "dense-comer",
        "canvas segmentation: ViT-CoMer vs the plain ViT under the same UperNet head",
        "bench.dense_comer:comer",
    ),
    Suite(
        "dense-hiend",
        "canvas segmentation from a tenth of the labels: Hi-End-MAE vs MAE vs scratch pretraining",
        "bench.dense_hiend:run",
    ),
    Suite(
        "detect-canvas",
        "canvas detection: FCOS vs Deformable DETR over a plain ViT, the untrained floor; W8A8 mAP50 drop",
        "bench.detection:detect",
    ),
    Suite(
        "detect-codetr",
        "canvas detection: Co-DETR vs the same Deformable DETR at equal steps (mAP, per-epoch mAP50)",
        "bench.detect_codetr:run",
    ),
    Suite(
        "detect-classify",
        "detect -> crop -> classify on one-class canvases: per-crop vs per-canvas accuracy, DeiT vs its CNN teacher",
        "bench.detect_classify:run",
    ),
    Suite(
        "arch-families",
        "TiC, DualToken-ViT, Hyena N-D, ViTamin vs a plain ViT of ~0.2M params: FMNIST top-1 at 16 and 32 px, img/s",
        "bench.arch_families:run",
    ),
    Suite(
        "arch-assemble",
        "Deep Model Assembling vs end-to-end training of a depth-8 micro ViT at the same epoch budget",
        "bench.arch_assemble:run",
    ),
    Suite(
        "edge-split",
        "ED-ViT: 2- and 5-way class-wise split + fusion vs the source ViT; the 2-way split served by 2 processes",
        "bench.edge_split:run",
    ),
    Suite(
        "imagetext-datacomp",
        "DataComp's filters on a generated noisy pool: zero-shot Fashion-MNIST top-1 at equal samples seen",
        "bench.imagetext:datacomp",
    ),
    Suite(
        "imagetext-vitamin",
        "image-text: ViTamin vs a plain ViT image tower of about the same size (zero-shot top-1)",
        "bench.imagetext:vitamin",
    ),
    Suite(
        "imagetext-shards",
        "image-text training throughput: streamed webdataset shards vs the in-memory CSV path",
        "bench.imagetext:shards",
    ),
    Suite(
        "dense-vitp",
        "canvas segmentation: ViT-P two-stage point classification (alpha sweep) vs the one-stage head",
        "bench.dense_vitp:run",
    ),
)


def find_suite(name: str) -> Suite:
    for s in SUITES:
        if s.name == name:
            return s
    names = ", ".join(s.name for s in SUITES)
    raise SystemExit(f"error: unknown suite '{name}'; expected one of: {names} (python -m bench --list)")


# -- what a suite returns -------------------------------------------------------------------------
@dataclass
class Table:
    """A markdown table: records whose ``"table"`` field is ``name`` (every record when None), one row each.

    ``columns`` are ``(header, template)``; a template is a ``str.format`` string over the record's fields
    (e.g. ``"{ratio:.2f}x ({ratio_min:.2f}-{ratio_max:.2f})"``). A cell whose fields are missing or None
    shows "-", so one table can hold rows that lack a measurement.
    """

    columns: list[tuple[str, str]]
    name: str | None = None
    title: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "title": self.title, "columns": [list(c) for c in self.columns]}


@dataclass
class Output:
    records: list[dict]
    tables: list[Table]
    notes: list[str] = field(default_factory=list)  # markdown lines shown above the tables
    extra: dict = field(default_factory=dict)  # raw nested results kept in the JSON, not rendered


# -- machine facts --------------------------------------------------------------------------------
def parse_cpuinfo(text: str) -> dict:
    """CPU model and the performance-relevant flags from /proc/cpuinfo text (first processor's)."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model name", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return {"cpu": model, "flags": [f for f in WANTED_FLAGS if f in flags]}


def _versions() -> dict[str, str | None]:
    # metadata, not import: reading a version must not import torch
    out: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git_commit() -> str | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip()[:12] + ("+dirty" if dirty.stdout.strip() else "")


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_facts(cpuinfo: str | None = None) -> dict:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    facts = parse_cpuinfo(cpuinfo)
    if not facts["cpu"]:
        facts["cpu"] = platform.processor() or platform.machine()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        **facts,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": _versions(),
        "commit": _git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


# -- running --------------------------------------------------------------------------------------
def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):  # numpy / torch scalars and arrays
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, set | frozenset):
        return sorted(o)
    return str(o)


def _suite_parser(suite: Suite, module: Any) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m bench {suite.name}", description=suite.description)
    p.add_argument("--quick", action="store_true", help="smoke mode: tiny repeats; its JSON is not a result")
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        help="[default: bench/results/NAME.json; bench/out/quick/NAME.json for --quick]",
    )
    p.add_argument(
        "--results",
        type=Path,
        default=None,
        help="RESULTS.md to update [default: bench/RESULTS.md; none for --quick]",
    )
    p.add_argument("--no-results", action="store_true", help="write the JSON only")
    if hasattr(module, "add_arguments"):
        module.add_arguments(p)
    return p


def run_suite(name: str, argv: list[str]) -> dict:
    suite = find_suite(name)
    mod_name, fn_name = suite.target.split(":")
    module = importlib.import_module(mod_name)
    parser = _suite_parser(suite, module)
    args = parser.parse_args(argv)
    if args.quick:
        # quick values override the defaults only: an option given on the command line wins
        given = {
            a.dest
            for a in parser._actions
            if any(x == o or x.startswith(o + "=") for o in a.option_strings for x in argv)
        }
        for key, value in getattr(module, "QUICK", {}).items():
            if key not in given:
                setattr(args, key, value)
    os.environ.setdefault("VITKIT_PROGRESS", "0")
    machine = machine_facts()
    load_before = load_average()
    if load_before and load_before[0] >= machine["usable_cores"] / 2 and not args.quick:
        # timing needs an idle machine; the numbers are still written, with the load beside them
        log(f"warning: load average {load_before[0]:.2f} on {machine['usable_cores']} usable cores: "
            "other work is running, timings will be noisy")  # fmt: skip
    t0 = time.perf_counter()
    out: Output = getattr(module, fn_name)(args)
    seconds = time.perf_counter() - t0
    options = {k: v for k, v in vars(args).items() if k not in ("json", "results", "no_results")}
    doc = {
        "schema": SCHEMA,
        "suite": suite.name,
        "description": suite.description,
        "quick": bool(args.quick),
        "command": "python -m bench " + shlex.join([suite.name, *argv]),
        "options": options,
        "machine": machine,
        "load_before": load_before,
        "load_after": load_average(),
        "seconds": round(seconds, 1),
        "notes": list(out.notes),
        "tables": [t.to_dict() for t in out.tables],
        "records": out.records,
        "extra": out.extra,
    }
    doc = json.loads(json.dumps(doc, default=_json_default))  # what a reader gets back, exactly
    dest = args.json or (OUT_DIR / "quick" if args.quick else RESULTS_DIR) / f"{suite.name}.json"
    write_text(dest, json.dumps(doc, indent=1) + "\n")
    print(render_section(doc))
    print(f"wrote {dest}", file=sys.stderr)
    results = args.results or (None if args.quick else RESULTS)
    if results is not None and not args.no_results:
        update_results(results, {suite.name: doc})
        print(f"updated {results}", file=sys.stderr)
    return doc


# -- rendering ------------------------------------------------------------------------------------
_FORMATTER = string.Formatter()


def format_cell(template: str, record: dict) -> str:
    fields = [f for _, f, _, _ in _FORMATTER.parse(template) if f]
    values = {}
    for f in fields:
        key = f.split(".")[0].split("[")[0]
        if record.get(key) is None:
            return "-"
        values[key] = record[key]
    try:
        text = template.format_map(values)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "-"
    return text.replace("|", "\\|")  # a pipe inside a cell would split it


def render_table(table: dict, records: Iterable[dict]) -> list[str]:
    rows = [r for r in records if table.get("name") is None or r.get("table") == table["name"]]
    lines = [f"**{table['title']}**", ""] if table.get("title") else []
    lines.append("| " + " | ".join(h for h, _ in table["columns"]) + " |")
    lines.append("|" + "---|" * len(table["columns"]))
    for r in rows:
        lines.append("| " + " | ".join(format_cell(t, r) for _, t in table["columns"]) + " |")
    return lines


def begin_marker(name: str) -> str:
    return f"<!-- {name}:begin -->"


def end_marker(name: str) -> str:
    return f"<!-- {name}:end -->"


def _load_line(doc: dict) -> str:
    def one(v: list[float]) -> str:
        return "/".join(f"{x:.2f}" for x in v) if v else "n/a"

    return f"load average (1/5/15 min) {one(doc['load_before'])} before, {one(doc['load_after'])} after"


def render_section(doc: dict) -> str:
    """The markdown of one suite's JSON, between its markers (ends with a newline)."""
    m = doc["machine"]
    v = m.get("versions", {})
    soft = ", ".join(f"{k} {v[k]}" for k in VERSIONED if v.get(k))
    cores = f"{m['cores']} cores" + (
        f" ({m['usable_cores']} usable)" if m.get("usable_cores") != m["cores"] else ""
    )
    lines = [begin_marker(doc["suite"]), f"## {doc['suite']}: {doc['description']}", ""]
    if doc.get("quick"):
        lines += ["**Quick smoke run (--quick): not a result.**", ""]
    if doc["load_before"] and doc["load_before"][0] > m.get("usable_cores", m["cores"]):
        lines += [f"**Loaded machine: 1-minute load {doc['load_before'][0]:.2f} before the run, above its "
                  f"{m.get('usable_cores', m['cores'])} usable cores; timings are suspect.**", ""]  # fmt: skip
    lines += [
        f"{m['date']}; {m['cpu']}, {cores}, flags {', '.join(m['flags']) or 'none of note'}; "
        f"Python {m['python']}, {soft}; commit {m.get('commit') or 'unknown'}.",
        f"Command: `{doc['command']}` ({doc['seconds']:.0f} s); {_load_line(doc)}.",
        "",
    ]
    if doc.get("notes"):
        lines += [*doc["notes"], ""]
    for t in doc["tables"]:
        lines += [*render_table(t, doc["records"]), ""]
    lines.append(end_marker(doc["suite"]))
    return "\n".join(lines) + "\n"


def placeholder_section(suite: Suite) -> str:
    return (
        f"{begin_marker(suite.name)}\n## {suite.name}: {suite.description}\n\n"
        f"Not yet run with the harness: `{suite.command}`.\n{end_marker(suite.name)}\n"
    )


HEADER = """# Benchmark results (generated)

Generated by the bench harness from `bench/results/*.json`; do not edit by hand. Each section comes from one
run of one suite on one machine: ratios are against a baseline measured in the same run, with their
spread over rounds. Re-run a suite with `python -m bench NAME` (it rewrites its section), or re-render
every section from the JSON files with `python -m bench render`. `python -m bench --list` lists the
suites; bench/README.md says how to time well. The hand-typed record from before the harness is
bench/HISTORY.md: the sections that docs cite by name ("The demo", "Compression (issue 6)", ...) are there.
"""


def replace_section(text: str, name: str, section: str) -> str:
    """``text`` with the block between NAME's markers replaced by ``section`` (appended when absent).

    Everything outside the markers stays byte-identical.
    """
    begin, end = begin_marker(name), end_marker(name)
    i = text.find(begin)
    j = text.find(end, i if i >= 0 else 0)
    if i >= 0 and j >= 0:
        j += len(end)
        if text.startswith("\n", j):
            j += 1
        return text[:i] + section + text[j:]
    return (text.rstrip("\n") + "\n\n" if text.strip() else "") + section


def update_results(path: Path, docs: dict[str, dict]) -> None:
    text = path.read_text(encoding="utf-8") if path.is_file() else HEADER
    for name, doc in docs.items():
        text = replace_section(text, name, render_section(doc))
    write_text(path, text)


def load_docs(out_dir: Path) -> dict[str, dict]:
    """The real (not --quick) result files in ``out_dir`` by suite name."""
    docs = {}
    for f in sorted(out_dir.glob("*.json")):
        doc = json.loads(f.read_text(encoding="utf-8"))
        if isinstance(doc, dict) and doc.get("schema") == SCHEMA and not doc.get("quick"):
            docs[doc["suite"]] = doc
    return docs


def render_all(out_dir: Path = RESULTS_DIR) -> str:
    """The whole RESULTS.md: header, then every suite in SUITES order, from its JSON or a placeholder."""
    docs = load_docs(out_dir)
    parts = [HEADER]
    for s in SUITES:
        parts.append(render_section(docs[s.name]) if s.name in docs else placeholder_section(s))
    for name in sorted(set(docs) - {s.name for s in SUITES}):  # a JSON whose suite was since renamed
        parts.append(render_section(docs[name]))
    return "\n".join(parts)


# -- command line ---------------------------------------------------------------------------------
def list_suites() -> str:
    width = max(len(s.name) for s in SUITES)
    return "\n".join(
        f"{s.name:<{width}}  {s.description}" + (f" (needs {s.needs})" if s.needs else "") for s in SUITES
    )


def check_suites() -> list[str]:
    """Import every suite's module and build its parser: the problems found (a renamed function, a
    clashing option, an import error), one line each. Imports the heavy code, so tests call it in a
    subprocess (``python -m bench --check``)."""
    problems = []
    for suite in SUITES:
        mod_name, fn_name = suite.target.split(":")
        try:
            module = importlib.import_module(mod_name)
            if not callable(getattr(module, fn_name, None)):
                problems.append(f"{suite.name}: {suite.target} is not a function")
                continue
            parser = _suite_parser(suite, module)
            dests = {a.dest for a in parser._actions}
            unknown = set(getattr(module, "QUICK", {})) - dests
            if unknown:
                problems.append(f"{suite.name}: QUICK sets unknown options {sorted(unknown)}")
        except Exception as e:  # report every suite, not only the first broken one
            problems.append(f"{suite.name}: {type(e).__name__}: {e}")
    return problems


USAGE = """usage: python -m bench --list
       python -m bench --check                      (import every suite, check its options)
       python -m bench NAME [--quick] [--results bench/RESULTS.md] [suite options]   (NAME --help: options)
       python -m bench render [--from bench/results] [--results bench/RESULTS.md]"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\nsuites:\n" + list_suites())
        return 0 if argv else 2
    if argv[0] == "--list":
        print(list_suites())
        return 0
    if argv[0] == "--check":
        problems = check_suites()
        print("\n".join(problems) or f"all {len(SUITES)} suites import and parse")
        return 1 if problems else 0
    if argv[0] == "render":
        p = argparse.ArgumentParser(
            prog="python -m bench render", description="re-render RESULTS.md from JSON"
        )
        p.add_argument(
            "--from", dest="from_dir", type=Path, default=RESULTS_DIR, help="folder of suite JSON files"
        )
        p.add_argument("--results", type=Path, default=RESULTS)
        a = p.parse_args(argv[1:])
        write_text(a.results, render_all(a.from_dir))
        print(f"rendered {a.results} from {a.from_dir}/*.json", file=sys.stderr)
        return 0
    run_suite(argv[0], argv[1:])
    return 0


# -- helpers shared by suites ---------------------------------------------------------------------
def ratio_spread(rounds: list[float], base_rounds: list[float]) -> tuple[float, float]:
    """Min and max of per-round ratios (rounds are interleaved, so round i of each is comparable)."""
    ratios = [a / b for a, b in zip(rounds, base_rounds, strict=True)]
    return min(ratios), max(ratios)


def as_records(rows: Iterable[dict], table: str | None = None, **common: Any) -> list[dict]:
    """Flat copies of ``rows`` tagged with ``table`` and the fields in ``common``."""
    out = []
    for r in rows:
        d = {**common, **r}
        if table is not None:
            d["table"] = table
        out.append(d)
    return out


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


__all__ = [
    "SUITES",
    "Output",
    "Suite",
    "Table",
    "as_records",
    "find_suite",
    "load_docs",
    "log",
    "machine_facts",
    "main",
    "parse_cpuinfo",
    "ratio_spread",
    "render_all",
    "render_section",
    "replace_section",
    "run_suite",
    "update_results",
]
