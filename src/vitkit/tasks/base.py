"""The Task contract: what a kind of problem (classification, retrieval, later segmentation, change
detection, detection, ...) tells the one training loop, the evaluator and the exporter.

A task names

- its **target type** (``target``): how ``ImageDataset.targets`` are laid out for it
  (``"class_index"`` (N,) int64, ``"multi_hot"`` (N, K) float, ``"identity"`` (N,) int64 whose
  equality means "relevant"; later ``"mask"`` (N, H, W) int64 for dense targets, ``"boxes"``);
- its **inputs** (``inputs``): the image tensors one sample feeds the model, ``("image",)`` today,
  ``("image_a", "image_b")`` for two-image tasks such as change detection;
- the **data URI schemes** it reads (``data_schemes``) and a check of the loaded data (``check_data``);
- its **head** (``num_outputs`` and ``build_head``), its **loss** (``loss(cfg) -> Objective``),
  its **metrics** (``metrics(outputs, targets)``, with torchmetrics where it has them),
  per-epoch **validation** (``validate``), the **evaluation outputs** (``evaluate`` /
  ``write_outputs``: metrics.json plus plots) and its **export signature** (``export_signature``).

A run records its task as a *spec* in ``model.json`` (``"classification"``,
``"retrieval:bits=32"``): the name and the options that differ from their defaults. Tasks register
themselves in their own module with :func:`register_task`; every module of this package is imported
when a task is first looked up, so a new built-in task is one new file (see docs/tasks.md).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from vitkit.errors import VitkitError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vitkit.config.train import TrainConfig
    from vitkit.data import BatchTransform, DataSplits, ImageDataset
    from vitkit.train.objectives import Objective


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of an exported model. ``shape`` uses ``"B"`` for the batch dimension."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str
    meaning: str


@dataclass(frozen=True)
class ExportSignature:
    """What an exported graph takes and returns, and what a deployment does with the outputs."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    postprocess: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class NoOptions(BaseModel):
    """Options of a task that takes none."""

    model_config = ConfigDict(extra="forbid", frozen=True)


TaskClass = TypeVar("TaskClass", bound=type)


def refuse_image_label_options(task: str, cfg: TrainConfig, targets: str, loss: str) -> None:
    """One line for an option that only means something for image labels (the dense tasks and
    detection share this): RandAugment, mixup, cutmix, erasing, label smoothing, long-tail
    re-weighting, a class-balancing sampler, another ``--loss``."""
    refused = {
        "randaug": cfg.randaug,
        "mixup": cfg.mixup,
        "cutmix": cfg.cutmix,
        "reprob": cfg.reprob,
        "label_smoothing": cfg.label_smoothing,
        "mixup_off_epoch": cfg.mixup_off_epoch,
        "longtail": cfg.longtail,
    }
    for name, value in refused.items():
        if value:
            raise VitkitError(
                f"task '{task}': --{name.replace('_', '-')} is for image labels; {targets} cannot take it"
            )
    if cfg.sampler != "random":
        raise VitkitError(f"task '{task}': --sampler {cfg.sampler} balances image labels; use random")
    if cfg.loss != "auto":
        raise VitkitError(f"task '{task}' trains with {loss}; drop --loss {cfg.loss}")


class Task:
    """Base class of every task; subclasses set the class attributes and override what differs.

    The defaults fit a task whose model maps one image to one output vector per sample
    (classification-like heads); dense or multi-input tasks override ``predict`` too.
    """

    name: ClassVar[str] = ""
    #: other names a run's model.json may hold for this task (older vitkit versions)
    aliases: ClassVar[tuple[str, ...]] = ()
    target: ClassVar[str] = "class_index"
    inputs: ClassVar[tuple[str, ...]] = ("image",)
    #: dataset URI schemes (vitkit.data.parse_uri) whose data this task can train on
    data_schemes: ClassVar[tuple[str, ...]] = ()
    #: metrics a CLI summary shows, in order
    summary_keys: ClassVar[tuple[str, ...]] = ()
    #: the per-epoch validation metric the progress line shows
    headline: ClassVar[str] = ""
    #: keys of :meth:`metrics` that :meth:`validate` reports each epoch (as ``val_<key>``)
    val_metrics: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type[BaseModel]] = NoOptions
    #: targets are per-pixel masks and the model a dense head (segmentation, change detection)
    dense: ClassVar[bool] = False
    #: the model is a ViT under a task head that model.json records ("head"): the dense tasks and
    #: detection; training builds it with :meth:`build_head` and sizes the model to the data
    head_model: ClassVar[bool] = False
    #: (title, file name) of the figures evaluation writes into a run, which `vitkit report` shows
    figures: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, options: BaseModel | None = None):
        self.options = options if options is not None else self.Options()

    @property
    def quality_key(self) -> str:
        """The metrics.json key that says how good a model is for this task (the headline without
        ``val_``): what compression stages compare before and after."""
        return self.headline.removeprefix("val_")

    # -- identity ------------------------------------------------------------------------------
    @property
    def spec(self) -> str:
        """``name`` or ``name:key=value,...`` with the options that differ from their defaults."""
        defaults = self.Options().model_dump()
        changed = {k: v for k, v in self.options.model_dump().items() if defaults.get(k) != v}
        if not changed:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in sorted(changed.items()))

    def __repr__(self) -> str:
        return f"<task {self.spec}>"

    # -- data and configuration ----------------------------------------------------------------
    def check_uri(self, uri: str) -> None:
        """Refuse a dataset URI whose scheme this task cannot read (before loading anything)."""
        from vitkit.data import parse_uri

        scheme, _ = parse_uri(uri)
        if self.data_schemes and scheme not in self.data_schemes:
            raise VitkitError(
                f"task '{self.name}' cannot train on '{uri}': it reads {', '.join(self.data_schemes)} data"
            )

    def check_data(self, data: DataSplits) -> None:
        """Refuse loaded data whose targets are not this task's target type."""

    def check_config(self, cfg: TrainConfig) -> None:
        """Refuse training options that mean nothing (or something wrong) for this task."""

    def batch_transforms(
        self, cfg: TrainConfig, model: nn.Module, data: DataSplits
    ) -> tuple[Any, Any] | None:
        """The loop's (training, evaluation) batch transforms, or None for the image-label ones
        (:class:`vitkit.data.BatchTransform`). Dense tasks move images and masks together."""
        return None

    # -- model ---------------------------------------------------------------------------------
    def num_outputs(self, data: DataSplits) -> int:
        """Width of the head's output (timm's ``num_classes``; 0 means the pre-logits features)."""
        return data.train.num_classes

    def build_head(self, model: nn.Module, num_outputs: int) -> nn.Module:
        """Give ``model`` this task's head with ``num_outputs`` outputs (timm's ``reset_classifier``),
        and keep its manifest true, so ``vitkit.load`` rebuilds the same shape."""
        from vitkit.models import get_manifest

        if getattr(model, "num_classes", None) != num_outputs:
            model.reset_classifier(num_outputs)
            manifest = get_manifest(model)
            if manifest is not None:
                manifest.kwargs["num_classes"] = num_outputs
        return model

    def check_head(self, model: nn.Module, data: DataSplits, model_name: str) -> None:
        want = self.num_outputs(data)
        have = getattr(model, "num_classes", None)
        if have is not None and have != want:
            raise VitkitError(
                f"model '{model_name}' has {have} outputs but task '{self.spec}' on this data needs {want}"
            )

    # -- training ------------------------------------------------------------------------------
    def loss(self, cfg: TrainConfig) -> Objective:
        raise NotImplementedError

    # -- evaluation ----------------------------------------------------------------------------
    def predict(
        self,
        model: nn.Module,
        data: ImageDataset,
        *,
        batch_size: int = 256,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        transform: BatchTransform | None = None,
    ) -> torch.Tensor:
        """The model's raw outputs for every sample of ``data``, in order (float32, CPU)."""
        from vitkit.models.inference import predict

        return predict(
            model, data, batch_size=batch_size, device=device, precision=precision, transform=transform
        )

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor, **context: Any) -> dict[str, Any]:
        """Metrics of ``outputs`` against ``targets``. ``context`` always holds ``num_classes`` (the
        dataset's class count, e.g. for per-class tables over classes absent from this set) when
        ``validate`` / ``evaluate`` call it; tasks take what they need and ignore the rest."""
        raise NotImplementedError

    def validate(
        self,
        model: nn.Module,
        data: ImageDataset,
        transform: BatchTransform,
        device: torch.device,
        precision: str,
        batch_size: int,
    ) -> dict[str, Any]:
        """Per-epoch validation metrics in the training precision: :attr:`val_metrics` of
        :meth:`metrics`, keys prefixed ``val_``."""
        outputs = self.predict(
            model, data, batch_size=batch_size, device=device, precision=precision, transform=transform
        )
        m = self.metrics(outputs, data.targets, num_classes=data.num_classes)
        return {f"val_{k}": m[k] for k in self.val_metrics}

    def evaluate(
        self,
        model: nn.Module,
        data: ImageDataset,
        out_dir: str | Path | None = None,
        *,
        batch_size: int = 256,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        transform: BatchTransform | None = None,
        outputs: torch.Tensor | None = None,
        **context: Any,
    ) -> dict[str, Any]:
        """All metrics of ``model`` on ``data`` (pass ``outputs`` to score precomputed ones); with
        ``out_dir``, also writes them (``write_outputs``). ``context``: task-specific inputs such as
        training class counts."""
        if outputs is None:
            outputs = self.predict(
                model, data, batch_size=batch_size, device=device, precision=precision, transform=transform
            )
        out = self.metrics(outputs, data.targets, **{"num_classes": data.num_classes, **context})
        out["classes"] = list(data.classes)
        out["data"] = data.name
        if out_dir is not None:
            self.write_outputs(out, data, out_dir)
        return out

    def write_outputs(self, metrics: dict[str, Any], data: ImageDataset, out_dir: str | Path) -> list[str]:
        """Write ``metrics.json`` and this task's plots into ``out_dir``; returns the file names."""
        from vitkit.io import write_json  # not vitkit.runs: tasks sit below run directories

        Path(out_dir).mkdir(parents=True, exist_ok=True)
        plots = self.write_plots(metrics, data, Path(out_dir))
        write_json(Path(out_dir) / "metrics.json", metrics)
        return ["metrics.json", *plots]

    def write_plots(self, metrics: dict[str, Any], data: ImageDataset, out_dir: Path) -> list[str]:
        return []

    def output_files(self, metrics: dict[str, Any]) -> list[str]:
        """The files ``write_outputs`` writes for these metrics (what a CLI lists as written)."""
        return ["metrics.json"]

    # -- deployment ----------------------------------------------------------------------------
    def export_signature(self, model: nn.Module) -> ExportSignature:
        raise NotImplementedError


# -- registry ----------------------------------------------------------------------------------
_TASKS: dict[str, type[Task]] = {}
_ALIASES: dict[str, str] = {}
_discovered = False


def register_task(cls: TaskClass) -> TaskClass:
    """Class decorator: make a task known by its ``name`` (and ``aliases``)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _TASKS[cls.name] = cls
    for alias in cls.aliases:
        _ALIASES[alias] = cls.name
    return cls


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    # the package's folder, not ``import vitkit.tasks``: the package imports this module
    for mod in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if mod.name != "base":
            importlib.import_module(f"vitkit.tasks.{mod.name}")


def known_tasks() -> list[str]:
    _discover()
    return sorted(_TASKS)


def parse_task_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"retrieval:bits=32,embed_dim=64"`` -> ``("retrieval", {"bits": "32", "embed_dim": "64"})``."""
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if not name:
        raise VitkitError(f"task '{spec}': expected NAME or NAME:key=value,... (e.g. retrieval:bits=32)")
    options: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise VitkitError(f"task '{spec}': option '{item}' is not key=value")
        options[key.strip()] = value.strip()
    return name, options


def get_task(spec: str) -> Task:
    """The task a spec names (aliases such as a legacy ``"multiclass"`` included), options validated."""
    _discover()
    name, raw = parse_task_spec(spec)
    name = _ALIASES.get(name, name)
    cls = _TASKS.get(name)
    if cls is None:
        raise VitkitError(f"unknown task '{name}' (known: {', '.join(known_tasks())})")
    try:
        options = cls.Options(**raw)
    except ValidationError as e:
        from vitkit.registry import format_validation_error

        raise VitkitError(format_validation_error(e, f"task '{spec}'")) from e
    return cls(options)


def resolve_task(spec: str, data: DataSplits | ImageDataset) -> Task:
    """The task a run trains: ``spec``, except that classification on multi-label data is multi-label
    classification (vitkit has always chosen it from the data)."""
    task = get_task(spec)
    if task.name == "classification" and data.multilabel:
        task = get_task("multilabel")
    return task


def task_for_data(data: DataSplits | ImageDataset) -> Task:
    """Classification or multi-label classification, whichever the targets are."""
    return resolve_task("classification", data)
