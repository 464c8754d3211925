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

The stages are the registered verbs (:mod:`vitkit.verbs`), called directly: no command line is built
or parsed. Everything is checked before the first stage runs, by the verb's own options class (the
one that also makes its CLI options): the stage names, every field (name, type, allowed values),
required fields, and that every input and every ``{NAME}`` reference in a value (e.g.
``teacher: "{cnn}"``) names an earlier run-producing stage.

A verb whose registration names an ``input`` field gets the input run directory(ies) there (a verb
with several run arguments, such as ``similarity A B``, one per argument). A verb registered with
``produces=True`` writes a new run directory, ``workdir/NAME``, which later stages read. Each stage's
record holds the equivalent command line (``argv``), to run it by hand. Resume: each completed stage writes
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
from vitkit.verbs import Verb, verbs

# Stage names the issue texts use, mapped onto verbs (and preset options).
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "int8": ("export", {"int8": "dynamic"}),
    "reduce_tokens": ("reduce-tokens", {}),
    "token-reduction": ("reduce-tokens", {}),
    "quantise": ("quantize", {}),
}
DEFAULT_OUTPUT = {"report": "{workdir}/{name}.html", "crop": "{workdir}/{name}.npz"}
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
    commands = verbs()
    stages: list[Stage] = []
    produced: list[str] = []  # run-producing stage names so far
    for i, raw in enumerate(doc["stages"], 1):
        where = f"{p}: stage {i}"
        if not isinstance(raw, dict) or "stage" not in raw:
            raise VitkitError(f"{where}: expected a mapping with a 'stage' field")
        kind = str(raw["stage"])
        verb_name, preset = ALIASES.get(kind, (kind, {}))
        if verb_name not in commands:
            raise VitkitError(f"{where}: unknown stage '{kind}' (known: {', '.join(sorted(commands))}, "
                              f"aliases {', '.join(sorted(ALIASES))})")  # fmt: skip
        name = str(raw.get("name") or kind)
        where = f"{p}: stage {i} ({name})"
        if any(s.name == name for s in stages):
            raise VitkitError(f"{where}: another stage is already named '{name}'; give this one a 'name'")
        if name.startswith(".") or "/" in name:
            raise VitkitError(f"{where}: 'name' must be a plain directory name, got '{name}'")
        verb = commands[verb_name]
        args = verb.arguments()
        fields = [f for f in verb.options.model_fields if f not in args]
        options = {**preset, **{k.replace("-", "_"): v for k, v in raw.items() if k not in RESERVED}}
        for k in options:
            if k not in fields:
                raise VitkitError(f"{where}: unknown field '{k}' for `vitkit {verb_name}` "
                                  f"(fields: {', '.join(sorted(fields))})")  # fmt: skip
        inputs: list[str] = []
        if verb.input is not None:
            want = raw.get("input")
            if want is None:
                if not produced:
                    raise VitkitError(f"{where}: `vitkit {verb_name}` reads a run directory but no earlier "
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
            if not _takes_many(verb):  # one run per positional argument (e.g. similarity A B)
                need = sum(verb.options.model_fields[a].is_required() for a in args)
                if not need <= len(inputs) <= len(args):
                    raise VitkitError(f"{where}: `vitkit {verb_name}` takes {need}–{len(args)} input runs "
                                      f"({', '.join(args)}), got {inputs}")  # fmt: skip
        elif "input" in raw:
            raise VitkitError(f"{where}: `vitkit {verb_name}` reads no run directory; drop 'input'")
        refs = _refs(list(options.values()))
        for r in refs:
            if r not in produced:
                raise VitkitError(f"{where}: '{{{r}}}' names no earlier run-producing stage "
                                  f"(earlier: {', '.join(produced) or 'none'})")  # fmt: skip
        default_output = DEFAULT_OUTPUT.get(verb_name, "").format(workdir=workdir, name=name) or None
        _validate(verb, where, options, _bind_inputs(verb, [str(workdir / n) for n in inputs]),
                  str(workdir / name) if verb.produces else options.get("output", default_output))  # fmt: skip
        stages.append(Stage(i, name, verb_name, options, inputs, verb.produces, refs))
        if verb.produces:
            produced.append(name)
    return Pipeline(p, workdir, stages)


def _validate(
    verb: Verb, where: str, options: dict[str, Any], inputs: dict[str, Any], output: str | None
) -> None:
    """The stage's fields, checked by the options class the verb runs with. A value holding a
    ``{NAME}`` reference is a path known only when its stage runs: it stands in as a plain path."""
    values = {k: (_refs_as_paths(v) if _refs(v) else v) for k, v in options.items()}
    values.update(inputs)
    if output is not None:
        values["output"] = output
    missing = [f for f, info in verb.options.model_fields.items() if info.is_required() and f not in values]
    if missing:
        raise VitkitError(f"{where}: `vitkit {verb.name}` needs field '{missing[0]}'")
    verb.parse(values, where)


def _refs_as_paths(value: Any) -> Any:
    if isinstance(value, list):
        return [_refs_as_paths(v) for v in value]
    return value.replace("{", "").replace("}", "") if isinstance(value, str) else value


def _takes_many(verb: Verb) -> bool:
    """Whether the verb's input field takes a list of runs (``report A B C``)."""
    import typing

    annotation = verb.options.model_fields[verb.input].annotation
    return typing.get_origin(annotation) is list


def _bind_inputs(verb: Verb, inputs: list[str]) -> dict[str, Any]:
    """The input run directories as values of the verb's argument fields."""
    if verb.input is None or not inputs:
        return {}
    if _takes_many(verb):
        return {verb.input: inputs}
    return dict(zip(verb.arguments(), inputs, strict=False))


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


def resolve(stage: Stage, verb: Verb, ctx: dict[str, str], inputs: list[str]) -> dict[str, Any]:
    """The stage's values (field name -> value) with references, inputs and its output filled in."""
    values = {k: _expand(v, ctx) for k, v in stage.options.items()}
    values.update(_bind_inputs(verb, inputs))
    if stage.produces:
        values["output"] = ctx["output"]
    elif stage.verb in DEFAULT_OUTPUT and "output" not in values and verb.takes("output"):
        values["output"] = _expand(DEFAULT_OUTPUT[stage.verb], ctx)
    return values


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
    from vitkit.io import read_json, write_json

    pipe = load_pipeline(path)
    commands = verbs()
    state = pipe.workdir / STATE_DIR
    outputs: dict[str, Path] = {s.name: pipe.workdir / s.name for s in pipe.stages if s.produces}
    results = []
    for s in pipe.stages:
        verb = commands[s.verb]
        ctx = {"workdir": str(pipe.workdir), "name": s.name, **{k: str(v) for k, v in outputs.items()}}
        inputs = [str(outputs[n]) for n in s.inputs]
        if inputs:
            ctx["input"] = inputs[0]
        if s.produces:
            ctx["output"] = str(outputs[s.name])
        values = resolve(s, verb, ctx, inputs)
        argv = verb.command_line(values)
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
            if not verb.takes("force"):
                raise VitkitError(f"{head}: output '{outputs[s.name]}' exists and `vitkit {s.verb}` "
                                  "cannot replace it; remove it")  # fmt: skip
            values["force"] = True
        echo(f"{head}: vitkit {' '.join(verb.command_line(values))}")
        record.unlink(missing_ok=True)
        try:
            options = verb.parse(values, head)
            # A bar (or, off a terminal, a line every 30 s) with the stage's elapsed time and time
            # left: some stages (calibration, attacks, bench) print nothing for minutes otherwise.
            with StageProgress(head, echo=echo):
                verb.run(options)
        except VitkitError as e:
            if str(e).startswith(head):
                raise
            raise VitkitError(f"{head} failed: {e}") from e
        write_json(record, {"key": key, "argv": argv, "stage": s.verb})
        results.append(StageOutcome(s.name, s.verb, "ran", ctx.get("output")))
    return results
