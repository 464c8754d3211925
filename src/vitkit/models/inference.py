"""Running a model over a dataset: the evaluation preprocessing of a model, batched logits, autocast."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from vitkit.data import BatchTransform, DenseBatchTransform, ImageDataset
from vitkit.models.factory import model_input_size, model_normalization


def autocast_context(device: torch.device | str, precision: str):
    device = torch.device(device)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def eval_transform(
    model: nn.Module, img_size: int | None = None, pair: bool = False
) -> BatchTransform | DenseBatchTransform:
    """Resize, channels, normalization; ``pair``: image pairs stacked on channels (change detection),
    each image of a pair adapted and normalized on its own."""
    c, h, w = model_input_size(model)
    mean, std = model_normalization(model)
    if pair:
        return DenseBatchTransform(img_size or (h, w), c // 2, mean, std, pair=True)
    return BatchTransform(img_size or (h, w), c, mean, std, train=False)


@torch.no_grad()
def predict(
    model: nn.Module,
    data: ImageDataset,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    transform: BatchTransform | DenseBatchTransform | None = None,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Logits (float32, on the CPU) for every image of ``data``, in order. The model is put in eval mode
    for the call and restored afterwards."""
    transform = transform or eval_transform(model, pair=data.pair)
    was_training = model.training
    model.eval()
    outs = []
    try:
        for i in range(0, len(data), batch_size):
            x = transform.images(data.images[i : i + batch_size]).to(device)
            with autocast_context(device, precision):
                y = forward(model, x) if forward else model(x)
            outs.append(y.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)
