"""Run directories: how stages compose. Every stage reads a run directory and writes a new one.

    runs/NAME/
      model.json         base model (timm name + kwargs), ordered transforms, classes, task, data
                         (task: a vitkit.tasks spec such as "classification" or "retrieval:bits=32";
                         runs written before tasks existed say "multiclass" or "multilabel")
      model.safetensors  weights (never a pickle)
      config.yaml        the resolved configuration that produced it
      metrics.json       what was measured
      history.csv        per-epoch curves (training stages)
      checkpoint.pt      training state for --resume (tensors only; loaded with weights_only=True)

Every file is written atomically (temp file + rename). A run whose training did not finish has a
checkpoint but no ``model.safetensors``; :func:`load` says so instead of loading half a model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vitkit import __version__
from vitkit.errors import VitkitError, upstream_reason
from vitkit.io import atomic_path, owned_output_dir, read_json, write_json
from vitkit.models import Manifest, create_model, get_manifest, set_manifest
from vitkit.models.manifest import check_kwargs
from vitkit.registry import check_order, get_transform
from vitkit.train.checkpoint import CHECKPOINT_NAME, check_compatible

MODEL_JSON = "model.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
METRICS = "metrics.json"
HISTORY = "history.csv"


@dataclass
class RunInfo:
    """What ``model.json`` says about a run besides the manifest."""

    path: Path
    manifest: Manifest
    classes: list[str] = field(default_factory=list)
    task: str = "classification"  # a vitkit.tasks spec ("none": an encoder without a head)
    data: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def check_run_dir(path: str | os.PathLike, force: bool = False) -> None:
    """Raise the error :func:`prepare_run_dir` would, without creating anything (to fail early)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise VitkitError(f"output '{p}' exists and is not a directory")
    if p.exists() and any(p.iterdir()) and not force:
        hint = " (use --resume to continue it)" if (p / CHECKPOINT_NAME).exists() else ""
        raise VitkitError(
            f"output directory '{p}' already exists and is not empty; choose another -o or pass --force{hint}"
        )


def prepare_run_dir(path: str | os.PathLike, force: bool = False) -> Path:
    """Create an empty run directory; refuse to reuse a non-empty one unless ``force``."""
    p = Path(path)
    check_run_dir(p, force)
    if p.exists() and any(p.iterdir()):
        shutil.rmtree(p)
    p.mkdir(parents=True, exist_ok=True)
    return p


@contextlib.contextmanager
def new_run_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """:func:`prepare_run_dir` for the block that fills the run; if the block fails, the run is undone.

    A run that failed before its first checkpoint (bad data, NaN loss in epoch 1, Ctrl-C twice)
    leaves no directory (or, in a directory that was already there, none of its files), so the
    rerun needs no --force: nothing in it could have been resumed. A run with ``checkpoint.pt`` is
    kept as it is, for ``--resume``.
    """
    with owned_output_dir(
        path,
        prepare=lambda: prepare_run_dir(path, force=force),
        keep_if=lambda p: (p / CHECKPOINT_NAME).is_file(),
    ) as p:
        yield p


def save_weights(path: str | os.PathLike, model: nn.Module) -> None:
    # Clone so tensors that share storage (tied or sliced weights) become separate entries.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "vitkit": __version__})


def save_model(
    run_dir: str | os.PathLike,
    model: nn.Module,
    *,
    classes: list[str],
    task: str = "classification",
    data: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors`` then ``model.json`` (the manifest last: its presence marks a
    complete model)."""
    manifest = get_manifest(model)
    if manifest is None:
        raise VitkitError(
            "the model has no vitkit manifest: build it with vitkit.create_model or vitkit.load"
        )
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_weights(run_dir / WEIGHTS, model)
    doc = {
        **manifest.to_dict(),
        "vitkit_version": __version__,
        "classes": list(classes),
        "task": task,
        "data": data or {},
        **({"extra": extra} if extra else {}),
    }
    write_json(run_dir / MODEL_JSON, doc)
    return run_dir


def read_run(run_dir: str | os.PathLike) -> RunInfo:
    p = Path(run_dir)
    if not p.is_dir():
        raise VitkitError(f"run directory '{p}' does not exist")
    mj = p / MODEL_JSON
    if not mj.is_file():
        if (p / CHECKPOINT_NAME).is_file():
            raise VitkitError(
                f"run '{p}' did not finish training (checkpoint.pt but no model yet); continue it with `vitkit train --resume {p}`"
            )
        raise VitkitError(f"'{p}' is not a vitkit run directory (no {MODEL_JSON})")
    try:
        doc = read_json(mj)
        # base.kwargs go to timm.create_model: only plain architecture arguments, nothing naming a file
        check_kwargs(doc["base"].get("kwargs", {}), str(mj))
        manifest = Manifest.from_dict(doc)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise VitkitError(f"{mj} is not a valid vitkit manifest ({e})") from e
    return RunInfo(
        p,
        manifest,
        list(doc.get("classes", [])),
        doc.get("task", "classification"),
        doc.get("data", {}),
        doc.get("extra", {}),
    )


def build_from_manifest(manifest: Manifest) -> nn.Module:
    """Create the base model, wrap it in its dense head if it has one, and replay the recorded
    transforms (structure only, no weights)."""
    if manifest.transforms:
        check_order([t.name for t in manifest.transforms])  # also: every name is a known technique
    model = create_model(manifest.name, **manifest.kwargs)
    if manifest.head is not None:
        from vitkit.models.heads import attach_head

        model = attach_head(model, manifest.head)
    for t in manifest.transforms:
        model = get_transform(t.name)(model, dict(t.config))
    got = get_manifest(model)
    if got is None or [r.name for r in got.transforms] != [t.name for t in manifest.transforms]:
        set_manifest(
            model, Manifest(manifest.name, dict(manifest.kwargs), list(manifest.transforms), manifest.head)
        )
    return model


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    p = Path(path)
    if not p.is_file():
        raise VitkitError(f"weights file '{p}' is missing")
    try:
        state = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise VitkitError(f"'{p}' is truncated or not a safetensors file ({upstream_reason(e, 120)})") from e
    check_compatible(model.state_dict(), state, str(p))
    model.load_state_dict(state)
    return model


def load(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a run's model: base model, transforms replayed in order, weights loaded. Eval mode.

    Never unpickles: the structure comes from ``model.json`` and the weights from safetensors.
    ``model.vitkit_run`` holds the run's :class:`RunInfo` (classes, task, data).
    """
    return _model_of(read_run(run_dir), device)


def _model_of(info: RunInfo, device: str | torch.device) -> nn.Module:
    model = build_from_manifest(info.manifest)
    load_weights(model, info.path / WEIGHTS)
    model.to(device).eval()
    object.__setattr__(model, "vitkit_run", info)
    return model


def read_metrics(run_dir: str | os.PathLike) -> dict[str, Any]:
    p = Path(run_dir) / METRICS
    return read_json(p) if p.is_file() else {}


def write_metrics(run_dir: str | os.PathLike, metrics: dict[str, Any]) -> None:
    write_json(Path(run_dir) / METRICS, metrics)


# -- the Run object: what every stage reads once ----------------------------------------------------
def splits_from_config(cfg: Any, img_size: int | None) -> Any:
    """The data splits a training config describes (``cfg``: a :class:`vitkit.config.TrainConfig`)."""
    from vitkit.data import load_splits

    return load_splits(
        cfg.data,
        val_fraction=cfg.val_fraction,
        seed=cfg.split_seed,
        longtail=cfg.longtail,
        train_size=cfg.train_size,
        val_size=cfg.val_size,
        img_size=img_size,
        strict=cfg.strict_data,
        train_samples=getattr(cfg, "train_samples", None),
    )


class Run:
    """A run directory, read once: ``Run.open(path)`` then ``.model()``, ``.config``, ``.task``,
    ``.classes``, ``.data(split)``, ``.metrics`` — each file is read (and the model built, the data
    loaded) the first time it is asked for, then kept. ``.derive(out, model, metrics, artifacts)``
    writes a new run that inherits this one's classes, task, data description and ``config.yaml``.

    The directory stays plain files (model.json, model.safetensors, config.yaml, metrics.json, ...),
    so runs written before this class existed open the same way.
    """

    def __init__(self, info: RunInfo) -> None:
        self.info = info
        self.path = info.path
        self._config: Any = None
        self._metrics: dict[str, Any] | None = None
        self._models: dict[str, nn.Module] = {}
        self._splits: Any = None

    @classmethod
    def open(cls, path: str | os.PathLike) -> Run:
        """Read ``model.json`` (one line naming the problem if it is not a complete run)."""
        return cls(read_run(path))

    # -- what model.json says
    @property
    def manifest(self) -> Manifest:
        return self.info.manifest

    @property
    def task(self) -> str:
        return self.info.task

    @property
    def classes(self) -> list[str]:
        return self.info.classes

    @property
    def transforms(self) -> list[str]:
        return [t.name for t in self.info.manifest.transforms]

    # -- config.yaml and metrics.json
    @property
    def config(self) -> Any:
        """The training configuration (:class:`vitkit.config.TrainConfig`); None when the run has no
        ``config.yaml`` (a model saved from Python)."""
        if self._config is None and (self.path / CONFIG).is_file():
            from vitkit.config.train import build_config

            self._config = build_config(self.path / CONFIG)
        return self._config

    @property
    def metrics(self) -> dict[str, Any]:
        """``metrics.json`` ({} when absent)."""
        if self._metrics is None:
            self._metrics = read_metrics(self.path)
        return self._metrics

    def fp32_val_metric(self, key: str = "top1") -> float | None:
        """``metrics[key]`` when metrics.json says it was measured in fp32 on the validation split of
        this run's own data (what training writes), else None: measure it again."""
        m = self.metrics
        if m.get("split") == "val" and m.get("eval_precision") == "fp32" and key in m:
            return float(m[key])
        return None

    # -- the model and the data
    def model(self, device: str | torch.device = "cpu") -> nn.Module:
        """The model (built from the manifest, weights loaded, eval mode), built once per device.
        Stages that change it work on a ``copy.deepcopy``."""
        key = str(device)
        if key not in self._models:
            self._models[key] = _model_of(self.info, device)
        return self._models[key]

    def data(self, split: str = "val", img_size: int | None = None) -> Any:
        """The ``train`` / ``val`` (/ ``test``) split of the data the run was trained on, as its
        ``config.yaml`` describes it (loaded once)."""
        if split not in ("train", "val", "test"):
            raise VitkitError(f"split must be train, val or test, got '{split}'")
        if self.config is None:
            raise VitkitError(f"run '{self.path}' has no {CONFIG}: cannot tell which data it was trained on")
        if self._splits is None:
            from vitkit.models import model_input_size

            size = img_size or model_input_size(self.model())[1]
            self._splits = splits_from_config(self.config, size)
        out = getattr(self._splits, split)
        if out is None:
            raise VitkitError(f"the data of run '{self.path}' ({self.config.data}) has no {split} split")
        return out

    def splits(self, img_size: int | None = None) -> Any:
        """All splits (:class:`vitkit.data.DataSplits`)."""
        self.data("val", img_size)
        return self._splits

    def eval_data(
        self,
        uri: str | None = None,
        img_size: int | None = None,
        *,
        strict: bool = False,
        same_classes: bool = True,
    ) -> Any:
        """The data to evaluate this run on: its own validation split when ``uri`` is its training
        data (or None), otherwise the whole of ``uri`` (its test/val split when it has one), checked
        to have the run's classes unless ``same_classes=False`` (retrieval is often scored on
        classes it never saw)."""
        if self.config is not None and (uri is None or uri == self.config.data):
            return self.data("val", img_size)
        if uri is None:
            raise VitkitError(
                f"run '{self.path}' has no training config: say which data to evaluate on with --data"
            )
        from vitkit.data import load_eval_data

        info = self.info
        data = load_eval_data(uri, img_size=img_size, strict=strict)
        if not same_classes:
            return data
        if info.classes and data.num_classes != info.num_classes:
            raise VitkitError(
                f"{uri} has {data.num_classes} classes but run '{info.path}' was trained on {info.num_classes}: num_classes mismatch"
            )
        if info.classes and data.classes != info.classes and not all(c.isdigit() for c in data.classes):
            raise VitkitError(
                f"{uri}: class names {data.classes[:4]}... differ from the run's {info.classes[:4]}..."
            )
        return data

    # -- a new run from this one
    def derive(
        self,
        output: str | os.PathLike,
        model: nn.Module,
        metrics: dict[str, Any],
        artifacts: dict[str, Any] | None = None,
        *,
        extra: dict[str, Any] | None = None,
        force: bool = False,
    ) -> Run:
        """Write a new run at ``output``: ``model`` (its manifest says what was done to it), this run's
        classes, task, data description and ``config.yaml``, ``metrics``, and ``artifacts`` (file
        name -> dict (JSON), str (text), bytes, a path to copy, or a callable ``fn(path)`` writing
        the file); ``extra`` goes into model.json's ``extra`` (e.g. ``{"quantized_from": ...}``). Every
        file is written atomically; if anything fails, nothing is left behind."""
        from vitkit.io import write_text

        if Path(output).resolve() == self.path.resolve():
            raise VitkitError(
                f"-o/--output '{output}' is the source run: write the new run to a new directory"
            )
        with new_run_dir(output, force=force) as out:
            save_model(out, model, classes=self.classes, task=self.task, data=self.info.data, extra=extra)
            if (self.path / CONFIG).is_file():
                write_text(out / CONFIG, (self.path / CONFIG).read_text())
            write_metrics(out, metrics)
            for name, value in (artifacts or {}).items():
                target = out / name
                if isinstance(value, dict | list):
                    write_json(target, value)
                elif isinstance(value, str):
                    write_text(target, value)
                elif isinstance(value, bytes):
                    with atomic_path(target) as tmp:
                        Path(tmp).write_bytes(value)
                elif isinstance(value, Path):
                    with atomic_path(target) as tmp:
                        shutil.copyfile(value, tmp)
                elif callable(value):
                    value(target)
                else:
                    raise TypeError(f"artifact '{name}': unsupported value {type(value).__name__}")
        return Run.open(out)
