"""Which precision training runs in: ``auto`` picks bf16 where it is fast and safe, fp32 elsewhere."""

from __future__ import annotations

import torch
from torch import nn

from vitkit.models import model_input_size


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 pays off on GPUs with bf16 and on CPUs with AMX or AVX-512 BF16; elsewhere it is emulated
    and several times slower than fp32 (measured on an AVX2-only EPYC: 7x slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    amx = getattr(cpu, "_is_amx_tile_supported", lambda: False)()
    avx512_bf16 = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
    return bool(amx or avx512_bf16)


def _overlapping_strided_convs(model: nn.Module) -> list[nn.Conv2d]:
    # A patchify conv (kernel == stride) never sees an input narrower than its kernel.
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.Conv2d) and max(m.stride) > 1 and tuple(m.kernel_size) != tuple(m.stride)
    ]


@torch.no_grad()
def bf16_cpu_conv_hazard(model: nn.Module, img_size: tuple[int, int] | None = None) -> str | None:
    """The name of a strided convolution that sees a one-pixel-wide input at ``img_size`` (default:
    the model's input size) with a kernel > 1 along that axis, or None.

    oneDNN's bf16 CPU convolution (PyTorch 2.14.1, AVX512-BF16 and AMX) returns non-finite weight and
    input gradients for this geometry in about one backward in five (pytorch/pytorch#169688 is the
    same family): a small CNN at a small image size, e.g. a ResNet's last stage on 16-px images,
    then stops training with a NaN loss. The forward pass is correct, so only training is affected.
    """
    convs = _overlapping_strided_convs(model)
    if not convs:
        return None
    names = {m: n for n, m in model.named_modules()}
    hits: list[str] = []

    def hook(m: nn.Module, inputs: tuple, _out) -> None:
        h, w = inputs[0].shape[-2:]
        kh, kw = m.kernel_size
        if (h == 1 and kh > 1) or (w == 1 and kw > 1):
            hits.append(names[m])

    handles = [m.register_forward_hook(hook) for m in convs]
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters(), None)
        c, h, w = model_input_size(model)
        h, w = img_size or (h, w)
        x = torch.zeros(1, c, h, w, device=p.device if p is not None else "cpu")
        model(x)
    except Exception:  # a model that needs more than an image to run: nothing can be said
        return None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return hits[0] if hits else None


def resolve_precision(
    precision: str,
    device: torch.device,
    model: nn.Module | None = None,
    img_size: tuple[int, int] | None = None,
) -> str:
    """``auto``: bf16 where it is fast (see :func:`bf16_is_fast`), unless ``model`` has a convolution
    whose bf16 gradients are unreliable on the CPU (:func:`bf16_cpu_conv_hazard`); then fp32."""
    if precision != "auto":
        return precision
    if not bf16_is_fast(device):
        return "fp32"
    if device.type == "cpu" and model is not None and bf16_cpu_conv_hazard(model, img_size) is not None:
        return "fp32"
    return "bf16"
