"""``vitkit pipeline pipeline.yaml``: a list of stages, each one a ``vitkit`` verb, run in order.

    workdir: runs/pipe            # every stage's output lives here
    stages:
      - stage: train              # a CLI verb (or an alias such as int8 → export --int8 dynamic)
        name: base                # output directory workdir/base [default: the stage name]
        model: vitkit_micro_p4_16 # every other key is an option of the verb, by its Python name
        epochs: 30
      - stage: export             # reads the previous run-producing stage's directory ...
        int8: dynamic
      - stage: report
        input: all                # ... or `input: NAME`, a list of names, or all: every run so far

The verbs are discovered from the typer app, so verbs that other packages add work as stages without
changes here. Everything is checked before the first stage runs: the stage names, every field
against the verb's parameters (name and type), required options, and that every input and every
``{NAME}`` reference in a value (e.g. ``teacher: "{cnn}"``) names an earlier run-producing stage.

A verb that takes a run as its first argument gets the input run directory(ies) there. A verb with an
``--output`` option that is not an analysis verb (``ANALYSIS_VERBS``) produces a new run directory,
``workdir/NAME``, which later stages read. Resume: each completed stage writes
``workdir/.pipeline/NAME.json`` with a hash of its resolved arguments and of its input runs' weight
files (SHA-256); a stage whose hash is unchanged (and whose output run is still there) is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vitkit.errors import VitkitError
from vitkit.progress import StageProgress

ANALYSIS_VERBS = {"export", "evaluate", "bench", "report", "attack", "perturb", "similarity",
                  "attention", "artifacts", "mil", "compare", "evaluate-heads", "rank-configs"}  # fmt: skip
# Stage names the issue texts use, mapped onto verbs (and preset options).
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "int8": ("export", {"int8": "dynamic"}),
    "reduce_tokens": ("reduce-tokens", {}),
    "token-reduction": ("reduce-tokens", {}),
    "quantise": ("quantize", {}),
}
NOT_STAGES = {"pipeline", "demo"}
DEFAULT_OUTPUT = {"report": "{workdir}/{name}.html"}
RESERVED = {"stage", "name", "input"}
STATE_DIR = ".pipeline"


@dataclass
class Stage:
    index: int
    name: str
    verb: str
    options: dict[str, Any]
    inputs: list[str]  # names of earlier stages whose run directories are the input
    produces: bool
    refs: list[str] = field(default_factory=list)  # stages named by {NAME} in option values


@dataclass
class Pipeline:
    path: Path
    workdir: Path
    stages: list[Stage]


def _commands() -> dict[str, Any]:
    import typer

    from vitkit.cli import _register, app

    _register()
    group = typer.main.get_command(app)
    return {k: v for k, v in group.commands.items() if k not in NOT_STAGES}  # type: ignore[attr-defined]


def _params(cmd: Any) -> tuple[list[Any], dict[str, Any]]:
    # Duck-typed: typer ships its own copy of click, so isinstance checks against click would fail.
    args = [p for p in cmd.params if p.param_type_name == "argument"]
    opts = {p.name: p for p in cmd.params if p.param_type_name == "option" and p.name}
    return args, opts


def _refs(value: Any) -> list[str]:
    import re

    if isinstance(value, str):
        return [
            m for m in re.findall(r"\{([A-Za-z0-9_.-]+)\}", value) if m not in ("workdir", "input", "name")
        ]
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    return []


def load_pipeline(path: str | os.PathLike) -> Pipeline:
    """Read and validate a pipeline file; one-line ``VitkitError`` for the first problem found."""
    p = Path(path)
    if not p.is_file():
        raise VitkitError(f"pipeline file '{p}' does not exist")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise VitkitError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("stages"), list) or not doc["stages"]:
        raise VitkitError(f"{p}: expected a mapping with a non-empty 'stages' list (and optional 'workdir')")
    extra = set(doc) - {"workdir", "stages"}
    if extra:
        raise VitkitError(f"{p}: unknown top-level field '{sorted(extra)[0]}' (expected workdir, stages)")
    workdir = Path(doc.get("workdir") or p.with_suffix(""))
    commands = _commands()
    stages: list[Stage] = []
    produced: list[str] = []  # run-producing stage names so far
    for i, raw in enumerate(doc["stages"], 1):
        where = f"{p}: stage {i}"
        if not isinstance(raw, dict) or "stage" not in raw:
            raise VitkitError(f"{where}: expected a mapping with a 'stage' field")
        kind = str(raw["stage"])
        verb, preset = ALIASES.get(kind, (kind, {}))
        if verb not in commands:
            raise VitkitError(f"{where}: unknown stage '{kind}' (known: {', '.join(sorted(commands))}, "
                              f"aliases {', '.join(sorted(ALIASES))})")  # fmt: skip
        name = str(raw.get("name") or kind)
        where = f"{p}: stage {i} ({name})"
        if any(s.name == name for s in stages):
            raise VitkitError(f"{where}: another stage is already named '{name}'; give this one a 'name'")
        if name.startswith(".") or "/" in name:
            raise VitkitError(f"{where}: 'name' must be a plain directory name, got '{name}'")
        cmd = commands[verb]
        args, opts = _params(cmd)
        options = {**preset, **{k.replace("-", "_"): v for k, v in raw.items() if k not in RESERVED}}
        for k, v in options.items():
            if k not in opts:
                raise VitkitError(f"{where}: unknown field '{k}' for `vitkit {verb}` "
                                  f"(fields: {', '.join(sorted(opts))})")  # fmt: skip
            _check_value(where, k, v, opts[k])
        needs_input = bool(args)
        inputs: list[str] = []
        if needs_input:
            want = raw.get("input")
            if want is None:
                if not produced:
                    raise VitkitError(f"{where}: `vitkit {verb}` reads a run directory but no earlier "
                                      "stage produces one (put a train/distill/... stage first)")  # fmt: skip
                inputs = [produced[-1]]
            elif want == "all":
                inputs = list(produced)
            else:
                inputs = [str(w) for w in (want if isinstance(want, list) else [want])]
            for n in inputs:
                if n not in produced:
                    raise VitkitError(f"{where}: input '{n}' is not the output of an earlier run-producing "
                                      f"stage (earlier: {', '.join(produced) or 'none'})")  # fmt: skip
            if args[0].nargs == 1:  # one run per positional argument (e.g. similarity A B)
                need = sum(bool(a.required) for a in args)
                if not need <= len(inputs) <= len(args):
                    raise VitkitError(f"{where}: `vitkit {verb}` takes {need}–{len(args)} input runs "
                                      f"({', '.join(a.name for a in args)}), got {inputs}")  # fmt: skip
        elif "input" in raw:
            raise VitkitError(f"{where}: `vitkit {verb}` reads no run directory; drop 'input'")
        refs = _refs(list(options.values()))
        for r in refs:
            if r not in produced:
                raise VitkitError(f"{where}: '{{{r}}}' names no earlier run-producing stage "
                                  f"(earlier: {', '.join(produced) or 'none'})")  # fmt: skip
        produces = "output" in opts and verb not in ANALYSIS_VERBS
        missing = [o for o in opts.values() if o.required and o.name not in options
                   and not (produces and o.name == "output")]  # fmt: skip
        if missing:
            raise VitkitError(f"{where}: `vitkit {verb}` needs field '{missing[0].name}'")
        stages.append(Stage(i, name, verb, options, inputs, produces, refs))
        if produces:
            produced.append(name)
    return Pipeline(p, workdir, stages)


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(scalar type, is a list) of a verb parameter's annotation: Optional[int] → (int, False)."""
    import typing

    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return _base_type(typing.get_args(annotation)[0])[0], True
    if origin is not None:  # Optional / Union: the first non-None member
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0]) if args else (str, False)
    return annotation, False


def _check_value(where: str, key: str, value: Any, opt: Any) -> None:
    """Type-check a field against the verb's annotation (paths are checked when the stage runs)."""
    if value is None:
        return
    desc = getattr(opt, "type_descriptor", None)
    typ, is_list = _base_type(desc.annotation) if desc is not None else (str, False)
    if isinstance(value, list) and not is_list:
        raise VitkitError(f"{where}: field '{key}' takes one value, got a list")
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, str) and _refs(v):
            continue
        ok = True
        if typ is bool:
            ok = isinstance(v, bool)
        elif typ is int:
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif typ is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        elif isinstance(v, (dict, list)):
            ok = False
        if not ok:
            name = getattr(typ, "__name__", str(typ))
            raise VitkitError(f"{where}: field '{key}' must be {name}, got {v!r}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _expand(value: Any, ctx: dict[str, str]) -> Any:
    if isinstance(value, str):
        for k, v in ctx.items():
            value = value.replace("{" + k + "}", v)
        return value
    if isinstance(value, list):
        return [_expand(v, ctx) for v in value]
    return value


def _argv(stage: Stage, cmd: Any, ctx: dict[str, str], inputs: list[str]) -> list[str]:
    _, opts = _params(cmd)
    argv = [stage.verb, *inputs]
    options = dict(stage.options)
    if stage.produces:
        options["output"] = ctx["output"]
    elif stage.verb in DEFAULT_OUTPUT and "output" not in options and "output" in opts:
        options["output"] = DEFAULT_OUTPUT[stage.verb]
    for k, v in options.items():
        opt = opts[k]
        v = _expand(v, ctx)
        flag = max(opt.opts, key=len)
        if opt.is_flag:
            if opt.secondary_opts:
                argv.append(flag if v else max(opt.secondary_opts, key=len))
            elif v:
                argv.append(flag)
            continue
        for item in v if isinstance(v, list) else [v]:
            argv += [flag, str(item)]
    return argv


def stage_key(stage: Stage, argv: list[str], run_dirs: list[Path]) -> str:
    h = hashlib.sha256(json.dumps(argv).encode())
    for d in run_dirs:
        w = d / "model.safetensors"
        h.update(_sha256(w).encode() if w.is_file() else b"-")
    return h.hexdigest()


@dataclass
class StageOutcome:
    name: str
    verb: str
    status: str  # ran | skipped
    output: str | None


def run_pipeline(path: str | os.PathLike, *, force: bool = False, echo=print) -> list[StageOutcome]:
    """Validate, then run the stages in order, skipping those whose hash is unchanged."""
    import typer

    from vitkit.cli import app
    from vitkit.io import read_json, write_json

    pipe = load_pipeline(path)
    commands = _commands()
    group = typer.main.get_command(app)
    state = pipe.workdir / STATE_DIR
    outputs: dict[str, Path] = {s.name: pipe.workdir / s.name for s in pipe.stages if s.produces}
    results = []
    for s in pipe.stages:
        ctx = {"workdir": str(pipe.workdir), "name": s.name, **{k: str(v) for k, v in outputs.items()}}
        inputs = [str(outputs[n]) for n in s.inputs]
        if inputs:
            ctx["input"] = inputs[0]
        if s.produces:
            ctx["output"] = str(outputs[s.name])
        argv = _argv(s, commands[s.verb], ctx, inputs)
        run_dirs = [outputs[n] for n in s.inputs + s.refs]
        key = stage_key(s, argv, run_dirs)
        record = state / f"{s.name}.json"
        done = record.is_file() and read_json(record).get("key") == key
        if done and s.produces:
            done = (outputs[s.name] / "model.json").is_file()
        head = f"stage {s.index}/{len(pipe.stages)} {s.name} (vitkit {s.verb})"
        if done and not force:
            echo(f"{head}: unchanged, skipped")
            results.append(StageOutcome(s.name, s.verb, "skipped", ctx.get("output")))
            continue
        if s.produces and outputs[s.name].exists() and any(outputs[s.name].iterdir()):
            if "force" not in _params(commands[s.verb])[1]:
                raise VitkitError(f"{head}: output '{outputs[s.name]}' exists and `vitkit {s.verb}` "
                                  "cannot replace it; remove it")  # fmt: skip
            argv.append("--force")
        echo(f"{head}: vitkit {' '.join(argv)}")
        record.unlink(missing_ok=True)
        try:
            # A bar (or, off a terminal, a line every 30 s) with the stage's elapsed time and time
            # left: some stages (calibration, attacks, bench) print nothing for minutes otherwise.
            with StageProgress(head, echo=echo):
                code = group.main(args=argv, standalone_mode=False, prog_name="vitkit")
        except VitkitError as e:
            raise VitkitError(f"{head} failed: {e}") from e
        except Exception as e:
            if not hasattr(e, "format_message"):  # not a click usage error: a bug, keep the traceback
                raise
            raise VitkitError(f"{head} failed: {e.format_message()}") from e
        if code == 130:  # Ctrl-C inside the stage: typer turned it into exit code 130; stop the pipeline too
            raise KeyboardInterrupt
        if code not in (None, 0):
            raise VitkitError(f"{head} failed with exit code {code}")
        write_json(record, {"key": key, "argv": argv, "stage": s.verb})
        results.append(StageOutcome(s.name, s.verb, "ran", ctx.get("output")))
    return results
