"""Distillation teachers: a frozen model, always in eval mode, fed with ITS OWN normalization and
input size.

The student's batch arrives normalized for the student (and augmented, mixed, erased). The teacher
gets the same pixels: un-normalized with the student's mean/std, channel-adapted, resized to the
teacher's input size (bicubic, as DeiT-LT's ``Resize(teacher_size, interpolation=3)``), then
normalized with the teacher's mean/std. timm's ``TokenDistillationTeacher.normalize_input`` does the
normalization part; DeiT's repository feeds the teacher the student's normalization, which is wrong
for a teacher trained with another one.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.errors import VitkitError
from vitkit.models import model_input_size, model_normalization


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying model of a DDP / torch.compile wrapper."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def renormalize(
    images: torch.Tensor,
    from_mean: Sequence[float],
    from_std: Sequence[float],
    to_mean: Sequence[float],
    to_std: Sequence[float],
    size: tuple[int, int],
    in_chans: int,
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """Images normalized with (from_mean, from_std) → the same pixels normalized with (to_mean,
    to_std) at ``size`` with ``in_chans`` channels."""
    dev, dt = images.device, images.dtype

    def stat(v: Sequence[float], c: int) -> torch.Tensor:
        v = list(v)
        v = v[:c] if len(v) >= c else v[:1] * c
        return torch.tensor(v, device=dev, dtype=dt).view(1, c, 1, 1)

    c = images.shape[1]
    x = images * stat(from_std, c) + stat(from_mean, c)  # pixel space, [0, 1] before augmentation
    if c != in_chans:
        if c == 1:
            x = x.expand(-1, in_chans, -1, -1)
        elif in_chans == 1:
            x = x.mean(1, keepdim=True)
        else:
            raise VitkitError(f"cannot feed {c}-channel student inputs to a {in_chans}-channel teacher")
    if tuple(x.shape[-2:]) != tuple(size):
        down = size[0] < x.shape[-2]
        x = F.interpolate(x, size=size, mode=interpolation, align_corners=False, antialias=down)
    return (x - stat(to_mean, in_chans)) / stat(to_std, in_chans)


class Teacher(nn.Module):
    """A frozen teacher. ``forward(images, student_mean, student_std)`` returns its logits for the
    student's batch, converted to the teacher's own normalization and input size.

    Args:
        model: any classifier (timm CNN or ViT, a ``vitkit.load``-ed run).
        input_size: (H, W) the teacher sees; default its own (``model_input_size``). DeiT-LT's
            ``--teacher-size``.
        name: where it came from (run directory or timm name), for reports.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        input_size: int | tuple[int, int] | None = None,
        interpolation: str = "bicubic",
        name: str = "",
    ):
        super().__init__()
        self.model = model
        for p in self.model.parameters():
            p.requires_grad_(False)
        c, h, w = model_input_size(model)
        if input_size is not None:
            h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        self.in_chans = c
        self.input_size = (int(h), int(w))
        self.mean, self.std = model_normalization(model)
        self.interpolation = interpolation
        self.name = name
        self.model.eval()

    @property
    def num_classes(self) -> int | None:
        n = getattr(self.model, "num_classes", None)
        return int(n) if n is not None else None

    def train(self, mode: bool = True) -> Teacher:
        # A teacher never leaves eval mode (BatchNorm statistics, dropout), whatever the loop does.
        return super().train(False)

    def prepare(
        self, images: torch.Tensor, student_mean: Sequence[float], student_std: Sequence[float]
    ) -> torch.Tensor:
        """The teacher's input for a student batch."""
        return renormalize(
            images,
            student_mean,
            student_std,
            self.mean,
            self.std,
            self.input_size,
            self.in_chans,
            self.interpolation,
        )

    @torch.no_grad()
    def forward(
        self, images: torch.Tensor, student_mean: Sequence[float], student_std: Sequence[float]
    ) -> torch.Tensor:
        self.model.eval()
        out = self.model(self.prepare(images, student_mean, student_std))
        if isinstance(out, tuple):  # a distilled ViT teacher in training mode: average its heads
            out = (out[0] + out[1]) / 2
        return out.float()

    def describe(self) -> dict:
        return {
            "teacher": self.name or type(self.model).__name__,
            "teacher_input_size": list(self.input_size),
            "teacher_mean": list(self.mean),
            "teacher_std": list(self.std),
        }


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or spec.startswith((".", "~")) or Path(spec).exists()


def load_teacher(
    spec: str | os.PathLike | nn.Module,
    *,
    num_classes: int | None = None,
    classes: list[str] | None = None,
    pretrained_file: str | os.PathLike | None = None,
    input_size: int | None = None,
    device: str | torch.device = "cpu",
) -> Teacher:
    """A :class:`Teacher` from a run directory, a timm model name (with local ``pretrained_file``
    weights: nothing is downloaded) or a model. ``num_classes``: what the student predicts; a teacher
    with another number of classes is refused in one line."""
    from vitkit.models import create_model
    from vitkit.runs import load

    if isinstance(spec, nn.Module):
        model, name = spec, type(spec).__name__
    else:
        spec = os.fspath(spec)
        if Path(spec).is_dir():
            model, name = load(spec, device="cpu"), spec
        elif _looks_like_path(spec):
            raise VitkitError(f"teacher run directory '{spec}' does not exist")
        else:
            import timm

            if not timm.is_model(spec):
                raise VitkitError(
                    f"teacher '{spec}' is neither a run directory nor a timm model name "
                    "(train one with `vitkit train ... -o runs/teacher`, then pass --teacher runs/teacher)"
                )
            if pretrained_file is None:
                raise VitkitError(
                    f"teacher '{spec}' is a timm name without weights: pass --teacher-weights FILE "
                    "(a local .safetensors/.pth; nothing is downloaded) or a trained run directory"
                )
            model = create_model(spec, num_classes=num_classes, pretrained_file=pretrained_file)
            name = spec
    teacher = Teacher(model, input_size=input_size, name=str(name))
    have = teacher.num_classes
    if num_classes is not None and have is not None and have != num_classes:
        raise VitkitError(
            f"teacher '{name}' predicts {have} classes but the student/data has {num_classes}: "
            "teacher and student must share the class list"
        )
    run = getattr(model, "vitkit_run", None)
    if classes and run is not None and run.classes and run.classes != list(classes):
        warnings.warn(
            f"teacher '{name}' was trained on classes {run.classes[:3]}..., the data has {list(classes)[:3]}...",
            stacklevel=2,
        )
    return teacher.to(device)
