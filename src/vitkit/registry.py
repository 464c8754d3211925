"""The technique registry: one registration per technique, made next to its code.

A technique that changes a model (a *transform*: LoRA, ToMe, pruning, quantization, ...) registers
itself once, at the bottom of its own module::

    register(Technique(
        name="tome",                       # the name recorded in the run's manifest
        summary="merge similar tokens ...",   # one line: `vitkit techniques`, the docs table
        paper="Token Merging: Your ViT But Faster (2023)",
        config=ToMeConfig,                 # its options (pydantic model or dataclass): the only validator
        replay=replay_tome,                # rebuild the structure on `vitkit.load` (no data)
        export=AS_IS,                      # AS_IS | prepare_with(fn) | not_exportable("reason")
        quantize=None,                     # or the reason quantization refuses a model carrying it
        requires=(),                       # transforms that must come earlier in the manifest
        train=train_transform,             # optional: `vitkit train --transform NAME:k=v,...`
        family="compress", verb="vitkit reduce-tokens --method tome",
    ))

Everything else derives from that one registration: ``vitkit.load`` replays it, ``vitkit export``
applies its export rule, ``vitkit quantize`` refuses what it must, ``vitkit train --transform``
resolves it, and ``vitkit techniques`` / docs/techniques.md list it. Adding a technique touches its
own module and its tests, nothing else.

Discovery: registrations run when their module is imported. Looking up a name this process has not
registered yet imports every module of the technique packages (:data:`TECHNIQUE_PACKAGES`, ~0.2 s
once torch is loaded), so loading a plain run imports no technique at all. This module itself
imports no torch (the CLI's help must stay fast).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vitkit.errors import VitkitError

if TYPE_CHECKING:
    from torch import nn

    from vitkit.train.callbacks import Callback

ReplayFn = Callable[["nn.Module", dict], "nn.Module"]
PrepareFn = Callable[["nn.Module"], "nn.Module"]

# Packages whose modules may register techniques (a new technique in one of them touches nothing here).
TECHNIQUE_PACKAGES = (
    "vitkit.adapt",
    "vitkit.analyze",
    "vitkit.architecture",
    "vitkit.compress",
    "vitkit.distill",
    "vitkit.pretrain",
)


def _resolve(target: str | Callable | None) -> Callable | None:
    if target is None or callable(target):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


# -- export rules -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Approximate:
    """Parity for a graph that approximates PyTorch on purpose: max |logit diff| and top-1 agreement."""

    max_abs_logit_diff: float
    min_top1_agreement: float
    why: str


@dataclass(frozen=True)
class ExportRule:
    """How a model carrying a transform exports: as it is, after a prepare hook (``fn(model) -> model``,
    e.g. LoRA merged into the base weights), or not at all (with the reason, printed in one line)."""

    prepare: str | PrepareFn | None = None  # "module:function" or a callable; None = as it is
    not_exportable: str | None = None
    parity: Approximate | None = None  # None: the graph computes the same function (float round-off)
    settled_by: str | None = None  # a later transform of this name already did what `prepare` does

    def resolve(self) -> PrepareFn | None:
        return _resolve(self.prepare)  # type: ignore[return-value]

    def describe(self) -> str:
        if self.not_exportable:
            return f"refused: {self.not_exportable}"
        if self.prepare is None:
            return "as it is"
        name = self.prepare if isinstance(self.prepare, str) else self.prepare.__name__
        approx = f" (approximate: logits within {self.parity.max_abs_logit_diff})" if self.parity else ""
        return f"after {name.rpartition(':')[2]}{approx}"


AS_IS = ExportRule()


def prepare_with(
    target: str | PrepareFn, parity: Approximate | None = None, settled_by: str | None = None
) -> ExportRule:
    return ExportRule(prepare=target, parity=parity, settled_by=settled_by)


def not_exportable(reason: str) -> ExportRule:
    return ExportRule(not_exportable=reason)


# -- training-time application (``vitkit train --transform NAME:key=value,...``) ---------------------
@dataclass
class TrainTransform:
    """What one ``--transform`` spec does to a training run (``vitkit.api.train_model`` runs it).

    ``apply`` edits the freshly built model before training (and records itself in the manifest);
    ``callbacks`` returns fresh training-loop callbacks (:class:`vitkit.train.Callback`: per-update
    work such as weight averaging), called once per training session;
    ``finalize`` runs on the trained model before it is evaluated and saved (e.g. merging).
    """

    apply: Callable[[nn.Module], nn.Module]
    callbacks: Callable[[], list[Callback]] | None = None
    finalize: Callable[[nn.Module], nn.Module] | None = None


TrainTransformFactory = Callable[[dict[str, str]], TrainTransform]


# -- the registration -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Technique:
    """One technique's registration (see the module docstring)."""

    name: str
    summary: str
    replay: str | ReplayFn
    export: ExportRule
    paper: str = ""  # "Title (year)"; empty only for vitkit's own plumbing (then say why in summary)
    config: type | None = None  # pydantic model or dataclass of the options it records
    quantize: str | None = None  # why quantization refuses a model carrying it (None: it composes)
    requires: tuple[str, ...] = ()  # transforms that must have been applied before this one
    train: str | TrainTransformFactory | None = None
    family: str = ""  # the package kind: adapt, architecture, compress, distill, analyze, ...
    verb: str = ""  # the command that applies it (docs)
    # where it applies: "image" (a timm classifier, the default), "dense" (a dense model: a ViT under
    # a segmentation/change head, vitkit.models.dense), or "any"; dense tasks refuse the others
    applies_to: str = "image"
    module: str = ""  # filled by register(): where the registration lives

    def replay_fn(self) -> ReplayFn:
        return _resolve(self.replay)  # type: ignore[return-value]

    def config_fields(self) -> list[tuple[str, str, Any, str]]:
        """(name, type, default, description) of every config field, for help and docs."""
        return config_fields(self.config) if self.config is not None else []


_TECHNIQUES: dict[str, Technique] = {}
_discovered = False


def register(technique: Technique) -> Technique:
    """Register ``technique`` (called once, next to its code). Registering a different technique under
    a taken name is a bug and raises; re-importing the same module is harmless."""
    if not technique.module:
        replay = technique.replay
        module = replay.partition(":")[0] if isinstance(replay, str) else getattr(replay, "__module__", "")
        technique = dataclasses.replace(technique, module=module)
    old = _TECHNIQUES.get(technique.name)
    if old is not None and old.module != technique.module:
        raise ValueError(
            f"technique '{technique.name}' is registered twice ({old.module} and {technique.module})"
        )
    _TECHNIQUES[technique.name] = technique
    return technique


def unregister(name: str) -> None:
    """Remove a registration (tests registering throw-away techniques clean up with this)."""
    _TECHNIQUES.pop(name, None)


def discover() -> None:
    """Import every module of :data:`TECHNIQUE_PACKAGES` once, so that every registration has run."""
    global _discovered
    if _discovered:
        return
    for package in TECHNIQUE_PACKAGES:
        pkg = importlib.import_module(package)
        for info in pkgutil.walk_packages(pkg.__path__, package + "."):
            importlib.import_module(info.name)
    _discovered = True


def technique(name: str, *, what: str = "the run's manifest names transform") -> Technique:
    """The registration of ``name``; an unknown name raises one line listing the known ones."""
    t = _TECHNIQUES.get(name)
    if t is None:
        discover()
        t = _TECHNIQUES.get(name)
    if t is None:
        raise VitkitError(
            f"{what} '{name}', which this vitkit does not know "
            f"(known: {', '.join(known_transforms()) or 'none'}); was it made by a newer vitkit?"
        )
    return t


def techniques() -> list[Technique]:
    """Every registration, by family then name."""
    discover()
    return sorted(_TECHNIQUES.values(), key=lambda t: (t.family, t.name))


def known_transforms() -> list[str]:
    discover()
    return sorted(_TECHNIQUES)


def get_transform(name: str) -> ReplayFn:
    """The replay function of transform ``name`` (what ``vitkit.load`` calls)."""
    return technique(name).replay_fn()


def check_order(names: list[str]) -> None:
    """Raise one line when a transform in ``names`` (a manifest's order) misses one it requires."""
    for i, name in enumerate(names):
        missing = [r for r in technique(name).requires if r not in names[:i]]
        if missing:
            raise VitkitError(
                f"transform '{name}' needs {', '.join(missing)} applied before it (manifest order: "
                f"{', '.join(names)})"
            )


def register_transform(name: str, replay: str | ReplayFn, export: ExportRule | None = None) -> Technique:
    """Register a bare replayable transform (tests, users' own transforms): no config, no paper.
    Without ``export`` it cannot be exported (nothing is exported on trust)."""
    return register(
        Technique(
            name=name,
            summary="(registered with register_transform)",
            replay=replay,
            export=export or not_exportable("it was registered without an export rule"),
        )
    )


# -- config validation (the only validator of technique options) -----------------------------------
def config_fields(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, description) of a pydantic model's or dataclass's fields."""
    if hasattr(cls, "model_fields"):
        out = []
        for name, f in cls.model_fields.items():  # type: ignore[attr-defined]
            default = f.default_factory() if f.default_factory is not None else f.default  # type: ignore[call-arg]
            out.append((name, _type_name(f.annotation), default, f.description or ""))
        return out
    if dataclasses.is_dataclass(cls):
        out = []
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default: Any = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            out.append((f.name, _type_name(f.type), default, f.metadata.get("help", "")))
        return out
    return []


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def format_validation_error(err: Any, source: str = "config") -> str:
    """One line for a pydantic ``ValidationError``: which field, what was wrong (the first three)."""
    parts = []
    for e in err.errors()[:3]:
        loc = ".".join(str(x) for x in e["loc"]) or "(config)"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown field '{loc}'")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"field '{loc}': {msg} (got {e.get('input')!r})")
    more = f" (+{len(err.errors()) - 3} more)" if len(err.errors()) > 3 else ""
    return f"{source}: " + "; ".join(parts) + more


def parse_config(cls: type, options: Any, what: str) -> Any:
    """``options`` (a dict, e.g. from ``--transform name:key=value``, a pipeline stage or a Python
    call) as a ``cls`` instance, validated by pydantic (types converted: "5" -> 5; a None value means
    the field's default). A bad or unknown field raises one :class:`VitkitError` line naming ``what``
    and the field. The one validator of technique, verb and quantization options."""
    from pydantic import BaseModel, TypeAdapter, ValidationError

    if isinstance(options, cls):
        return options
    options = {k: v for k, v in dict(options or {}).items() if v is not None}
    known = [f[0] for f in config_fields(cls)]
    unknown = [k for k in options if k not in known]
    if unknown:
        raise VitkitError(f"{what}: unknown option '{unknown[0]}' (known: {', '.join(known)})")
    try:
        if isinstance(cls, type) and issubclass(cls, BaseModel):
            return cls(**options)
        return TypeAdapter(cls).validate_python(options)
    except ValidationError as e:
        parts = []
        for err in e.errors()[:3]:
            field = ".".join(str(x) for x in err["loc"]) or "(options)"
            msg = err["msg"].removeprefix("Value error, ")
            got = "" if "got " in msg else f" (got {err.get('input')!r})"  # a validator's own text may say it
            parts.append(f"option '{field}': {msg}{got}")
        raise VitkitError(f"{what}: " + "; ".join(parts)) from e


# -- ``vitkit train --transform`` --------------------------------------------------------------------
def register_train_transform(name: str, factory: str | TrainTransformFactory) -> None:
    """Let ``--transform name:...`` resolve to ``factory`` (tests; techniques set ``train=`` instead).
    Registers a bare technique under ``name`` when none exists."""
    t = _TECHNIQUES.get(name)
    if t is None:
        t = Technique(
            name=name,
            summary="(registered with register_train_transform)",
            replay=lambda model, config: model,
            export=not_exportable("it was registered without an export rule"),
        )
    register(dataclasses.replace(t, train=factory))


def known_train_transforms() -> list[str]:
    discover()
    return sorted(n for n, t in _TECHNIQUES.items() if t.train is not None)


def parse_transform_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"gmm:k=5,form=additive"`` -> ``("gmm", {"k": "5", "form": "additive"})``; values stay strings
    (the technique's own config validates and converts them)."""
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if not name:
        raise VitkitError(f"transform '{spec}': expected NAME or NAME:key=value,... (e.g. gmm:k=5)")
    options: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise VitkitError(f"transform '{spec}': option '{item}' is not key=value")
        options[key.strip()] = value.strip()
    return name, options


def get_train_transform(spec: str) -> TrainTransform:
    """Resolve a ``--transform`` spec to its :class:`TrainTransform` (options validated here)."""
    name, options = parse_transform_spec(spec)
    t = _TECHNIQUES.get(name)
    if t is None or t.train is None:
        discover()
        t = _TECHNIQUES.get(name)
    if t is None or t.train is None:
        raise VitkitError(
            f"transform '{name}' is not one vitkit train can apply "
            f"(known: {', '.join(known_train_transforms()) or 'none'})"
        )
    factory: Any = _resolve(t.train)
    return factory(options)


# -- the docs table ---------------------------------------------------------------------------------
def markdown_table() -> str:
    """docs/techniques.md's table, generated from the registrations (a test keeps the file in step)."""
    rows = [
        "| technique | family | what it does | paper | export | quantize after it | options | applied by |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in techniques():
        options = ", ".join(f"`{name}`" for name, *_ in t.config_fields()) or "—"
        quant = f"refused: {t.quantize}" if t.quantize else "yes"
        cells = [f"`{t.name}`", t.family, t.summary, t.paper or "—", t.export.describe(), quant, options]
        cells.append(f"`{t.verb}`" if t.verb.startswith("vitkit") else t.verb or "—")
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"
