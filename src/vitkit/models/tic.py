"""TiC: ViTs whose token mixer is MSA-Conv (self-attention inside a convolution window), as
timm-registered models.

Paper: Zhang, Wang, Bian & Xiong, "TiC: Exploring Vision Transformer in Convolution" (arXiv 2310.04134,
2023); code: zs670980918/MSA-Conv @2d96f54 (``core/op/Transformer_in_Convolution.py``: the layer
``MSA_Conv_2d``; ``core/op/msa_conv_v1_1.py`` and ``msa_conv1_v1_1.py`` with ``msa_conv.cpp``: the QK and
AV operators; ``validation.py``: their ``nn.Unfold`` reference), read and re-implemented here in plain
PyTorch. Only the operator and that one layer are public: there is no TiC model, config or training
script.

The operator, :func:`msa_conv`, on ``q, k, v`` (B, heads, d, H, W): for every grid position ``p`` and the
``K = k_h k_w`` offsets ``delta_j`` of a (dilated) ``k_h x k_w`` convolution window,

    a[j, p] = <q_p, k_{p + delta_j}> * scale,   alpha = softmax_j(a),   o_p = sum_j alpha[j, p] v_{p + delta_j}

with the code's zero padding ``dilation (k - 1) / 2`` of ``k`` and ``v``: a window position outside the
grid is not masked, it is a key of zeros (logit 0) whose value is zero, and it stays in the softmax
as the code has it (the CUDA op's im2col writes zeros there). Stride 1, as the op (its output always
has the input's H x W). The layer (``MSA_Conv_2d.forward``) around it, kept by :class:`MSAConvMixer`
with ``tail="conv"`` (the presets): ``q, k, v = chunk(Conv1x1(x), 3)`` (a ``Linear`` on the tokens,
with bias, as the code's 1x1 conv), the operator, ``o + x`` (the code's ``out += x``: the layer's input
added before its "mlp"), then that "mlp", a k x k convolution without bias (the same k as the window,
no dilation, as the code), then ReLU; the conv has no skip connection around it, as in the code.

In a timm block (``attn_layer``; pre-norm): ``x + ReLU(Conv_kxk(MSA(LN(x)) + LN(x)))``, then timm's
MLP. The token grid is the patch grid, so the window always operates on the tokens of the image the
model is given: there is no position embedding (``pos_embed="none"``, as TiC: the window is the only
spatial structure) and the presets are built with ``dynamic_img_size=True``, so a model trained at
16 px runs at 32 px (an 8x8 token grid, the same window).

At another resolution the window keeps its size in tokens, so it covers less of the image. In the
setting of ``tests/models/test_tic.py`` (nano, 3 epochs on ``digits`` at 16 px, 3 seeds; a unit-test
measurement, not a benchmark) top-1 0.94-0.96 at 16 px falls to 0.19-0.20 at 32 px (bilinear 2x).
``grid_dilation=True`` (not in the paper or the code; off in the presets, :func:`set_grid_dilation`
switches it on a trained model) multiplies the dilation of the window and of the conv tail by
``r = round(grid side / training grid side)`` (lowered to a divisor of the side), so the window covers
the same part of the image as in training: the same weights then give 0.86-0.91 at 32 px. It is
computed exactly as dilation ``r`` (tested): the layer, unchanged, on each of the ``r x r`` interleaved
subgrids (a reshape, so quantized or wrapped submodules still run); at the training size ``r = 1`` and
nothing changes.

Differences from the code, on purpose:

- **Heads.** The code's op is one head over all C channels (scale ``C ** -0.5``); here ``num_heads``
  splits the channels into groups with a softmax each (scale ``head_dim ** -0.5``), as "MSA" (multi-head
  self-attention) in the name says. ``num_heads=1`` is the code's operator exactly (tested).
- **Stride 1 and same padding in the tail conv.** The code's layer strides its "mlp" conv (``stride``,
  ``padding=1`` whatever k) to downsample a CNN stage; an isotropic ViT keeps its grid, so the conv is
  stride 1 with padding (k - 1) / 2, and ``C_out = C``.
- **Odd windows only.** For an even k the code's padding ``dilation (k - 1) // 2`` does not centre the
  window, and the op's im2col grid (H - 1 rows for k = 2) no longer matches the output it allocates at
  H x W; even windows are refused.
- **Dropout.** The code's attention dropout (0.1 by default) is timm's ``attn_drop_rate`` (0 by
  default). As in the code, the operator runs in float32 (q, k, v cast, as its ``t.float()``), also
  under autocast; its output is cast back to the tokens' dtype before ``o + x``.
- **Autograd, not the code's backward.** The CUDA backward is not ported; autograd through pad and
  slices gives the gradients (the code's ``backward_python`` ignores dilation: not used).
- ``tail="linear"`` (not the code: an ablation) replaces ``ReLU(Conv(o + x))`` by a ``Linear`` output
  projection, the plain ViT attention's, so the block is a plain ViT block with the window mixer.

Not built (the paper's, not in the code): the hierarchical 4-stage TiC network, its Multi-Directional
Cyclic Shift (rolling channel groups so windows reach far tokens) and Inter-Pooling. Class and register
tokens are refused (the window works on the grid), and the grid must be square (the mixer sees
(B, N, D) tokens and takes ``sqrt(N)``).

**Attention hooks.** The probabilities are local, (B, heads, K, H, W), not the (B, heads, N, N) of
global attention that vitkit's ``VitkitAttention`` taps, logit hooks and attention biases assume (and
that ToMe, EViT, GMM masks or attention rollout read), so the mixer is not a ``VitkitAttention``:
``attention_modules(model)`` is empty and ``attention_maps(model)`` refuses the model in one line.
:func:`msa_conv` returns the local probabilities when asked (``return_probs=True``).

| name                      | img | patch | dim | depth | heads | mlp | window | params (10 cls) | plain ViT match              |
|---------------------------|-----|-------|-----|-------|-------|-----|--------|-----------------|------------------------------|
| vitkit_tic_nano_p4_16     | 16  | 4     | 32  | 2     | 2     | 2   | 3x3    | 35k (tests)     | vitkit_nano_p4_16 (20k)      |
| vitkit_tic_micro_p4_16    | 16  | 4     | 64  | 3     | 4     | 2   | 3x3    | 0.20M           | vitkit_micro_p4_16 (0.21M)   |
| vitkit_tic_tiny_p4_32     | 32  | 4     | 128 | 7     | 4     | 2   | 3x3    | 1.85M           | vitkit_tiny_p4_32 (1.81M)    |

Options (``timm.create_model`` / ``vitkit.create_model`` keyword arguments): ``window`` (odd, default 3),
``dilation`` (default 1), ``tail`` (``"conv"`` or ``"linear"``), ``grid_dilation`` (default False). They
are not yet in the manifest's allow-list (``models/manifest.py``), so a run cannot record them (and
``model_kwargs`` refuses them); the presets reload, and ``set_grid_dilation`` applies after loading.

This module imports nothing of vitkit but :mod:`vitkit.errors` and ``models.pretrained_cfg``:
``vitkit.models`` imports it to register the models.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from vitkit.errors import VitkitError
from vitkit.models.pretrained_cfg import small_input_cfg

__all__ = ["MSAConvMixer", "TiCVisionTransformer", "msa_conv", "msa_conv_layer", "set_grid_dilation"]


def _window(window: int | tuple[int, int]) -> tuple[int, int]:
    kh, kw = (window, window) if isinstance(window, int) else tuple(window)
    if kh < 1 or kw < 1 or kh % 2 == 0 or kw % 2 == 0:
        raise VitkitError(f"MSA-Conv window must be odd (centred on its token), got {kh}x{kw}")
    return kh, kw


def msa_conv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | tuple[int, int] = 3,
    dilation: int = 1,
    scale: float | None = None,
    attn_drop: nn.Module | None = None,
    return_probs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The MSA-Conv operator (module docstring) on ``q, k, v`` (B, heads, d, H, W) -> (B, heads, d, H, W);
    with ``return_probs`` also the probabilities (B, heads, K, H, W), window offsets in ``F.unfold``'s
    order (row-major). ``scale`` defaults to ``d ** -0.5``.

    Written as zero padding and K shifted slices (no ``unfold``): Pad, Slice, Mul, ReduceSum and
    Softmax in an ONNX graph, any H x W.
    """
    kh, kw = _window(window)
    if dilation < 1:
        raise VitkitError(f"MSA-Conv dilation must be >= 1, got {dilation}")
    H, W = q.shape[-2:]
    ph, pw = dilation * (kh - 1) // 2, dilation * (kw - 1) // 2
    kp, vp = F.pad(k, (pw, pw, ph, ph)), F.pad(v, (pw, pw, ph, ph))
    offsets = [(i * dilation, j * dilation) for i in range(kh) for j in range(kw)]
    logits = torch.stack([(q * kp[..., y : y + H, x : x + W]).sum(2) for y, x in offsets], dim=2)
    probs = (logits * (q.shape[2] ** -0.5 if scale is None else scale)).softmax(dim=2)
    dropped = probs if attn_drop is None else attn_drop(probs)
    out = sum(dropped[:, :, n : n + 1] * vp[..., y : y + H, x : x + W] for n, (y, x) in enumerate(offsets))
    return (out, probs) if return_probs else out


class MSAConvMixer(nn.Module):
    """The MSA-Conv layer as a timm ``attn_layer`` on (B, H*W, D) tokens of a square grid (module
    docstring); takes the arguments timm passes an attention layer."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Any = None,
        *,
        window: int | tuple[int, int] = 3,
        dilation: int = 1,
        tail: Literal["conv", "linear"] = "conv",
        grid_dilation: bool = False,
        train_grid: int | None = None,
        **_: Any,
    ):
        super().__init__()
        if dim % num_heads:
            raise VitkitError(f"MSA-Conv: dim {dim} is not divisible by num_heads {num_heads}")
        if qk_norm or scale_norm:
            raise VitkitError("MSA-Conv has no q/k norm or attention-output norm (qk_norm, scale_attn_norm)")
        if tail not in ("conv", "linear"):
            raise VitkitError(f"MSA-Conv tail must be 'conv' (the code's layer) or 'linear', got {tail!r}")
        self.window = _window(window)
        if dilation < 1:
            raise VitkitError(f"MSA-Conv dilation must be >= 1, got {dilation}")
        self.dilation, self.tail = dilation, tail
        self.grid_dilation, self.train_grid = grid_dilation, train_grid
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)  # the code's 1x1 qkv_conv (with bias)
        self.attn_drop = nn.Dropout(attn_drop)
        if tail == "conv":  # the code's "mlp": a k x k conv without bias, then ReLU
            kh, kw = self.window
            self.conv = nn.Conv2d(dim, dim, self.window, padding=(kh // 2, kw // 2), bias=False)
        else:
            self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise VitkitError(
                "MSA-Conv attends within a convolution window on the token grid; it takes no mask"
            )
        B, N, D = x.shape
        L = math.isqrt(N)
        if L * L != N:
            raise VitkitError(
                f"MSA-Conv needs a square token grid and no prefix tokens; got {N} tokens (class_token=False)"
            )
        r = self.grid_ratio(L)
        if r == 1:
            return self._mix(x, L)
        # dilation r on the L x L grid == the undilated layer on each of the r x r interleaved subgrids
        m = L // r
        phases = x.reshape(B, m, r, m, r, D).permute(0, 2, 4, 1, 3, 5).reshape(B * r * r, m * m, D)
        y = self._mix(phases, m).reshape(B, r, r, m, m, D).permute(0, 3, 1, 4, 2, 5)
        return y.reshape(B, N, D)

    def grid_ratio(self, side: int) -> int:
        """The factor ``grid_dilation`` multiplies the dilation by on a ``side`` x ``side`` grid:
        ``round(side / train_grid)``, lowered to a divisor of ``side``; 1 when off."""
        if not self.grid_dilation or not self.train_grid:
            return 1
        r = max(1, round(side / self.train_grid))
        while side % r:
            r -= 1
        return r

    def _mix(self, x: torch.Tensor, L: int) -> torch.Tensor:
        B, _, D = x.shape
        q, k, v = self.qkv(x).transpose(1, 2).reshape(B, 3, self.num_heads, self.head_dim, L, L).unbind(1)
        q, k, v = q.float(), k.float(), v.float()  # as the code (its CUDA op wants float32)
        o = msa_conv(q, k, v, self.window, self.dilation, self.scale, self.attn_drop)
        o = o.to(x.dtype).reshape(B, D, L, L)
        if self.tail == "conv":
            y = F.relu(self.conv(o + x.transpose(1, 2).reshape(B, D, L, L))).flatten(2).transpose(1, 2)
        else:
            y = self.proj(o.flatten(2).transpose(1, 2))
        return self.proj_drop(y)

    def extra_repr(self) -> str:
        kh, kw = self.window
        extra = f", grid_dilation (training grid {self.train_grid})" if self.grid_dilation else ""
        return (
            f"num_heads={self.num_heads}, window={kh}x{kw}, dilation={self.dilation}, tail={self.tail}{extra}"
        )


def set_grid_dilation(model: nn.Module, on: bool = True) -> nn.Module:
    """Switch ``grid_dilation`` on (or off) in every :class:`MSAConvMixer` of ``model``, in place, e.g.
    to evaluate a run trained without it at another resolution (no weight changes). Returns the model."""
    mixers = [m for m in model.modules() if isinstance(m, MSAConvMixer)]
    if not mixers:
        raise VitkitError(f"{type(model).__name__} has no MSA-Conv mixers (a vitkit_tic_* model)")
    for m in mixers:
        if on and not m.train_grid:
            raise VitkitError("grid_dilation needs the training grid side (train_grid) of the mixer")
        m.grid_dilation = on
    return model


@cache
def msa_conv_layer(**options: Any) -> type[MSAConvMixer]:
    """:class:`MSAConvMixer` with its options bound, as a class: timm's ``Block`` takes ``attn_layer``
    as a class (one per setting, cached, so equal settings share it)."""

    def __init__(self, dim: int, num_heads: int = 1, **kwargs: Any) -> None:
        MSAConvMixer.__init__(self, dim, num_heads, **{**options, **kwargs})

    return type("MSAConvMixer", (MSAConvMixer,), {"__init__": __init__, "__module__": __name__})


class TiCVisionTransformer(VisionTransformer):
    """timm's ``VisionTransformer`` with :class:`MSAConvMixer` blocks, no class token and no position
    embedding (the presets); nothing of timm's forward is changed."""


_cfg = small_input_cfg


default_cfgs = generate_default_cfgs(
    {
        "vitkit_tic_nano_p4_16": _cfg(16),
        "vitkit_tic_micro_p4_16": _cfg(16),
        "vitkit_tic_tiny_p4_32": _cfg(32),
    }
)

_ARCHS = {
    "nano": dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
    "micro": dict(img_size=16, patch_size=4, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0),
    "tiny": dict(img_size=32, patch_size=4, embed_dim=128, depth=7, num_heads=4, mlp_ratio=2.0),
}

TIC_OPTIONS = ("window", "dilation", "tail", "grid_dilation")


def _build(variant: str, arch: str, pretrained: bool, **kwargs: Any) -> TiCVisionTransformer:
    args: dict[str, Any] = {
        **_ARCHS[arch],
        "num_classes": 10,
        "pos_embed": "none",
        "dynamic_img_size": True,
        "global_pool": "avg",
        **kwargs,
    }
    if args.pop("class_token", False) or args.get("reg_tokens"):
        raise VitkitError(
            f"{variant}: MSA-Conv attends within a window of the token grid; it takes no class or register tokens"
        )
    options = {k: args.pop(k) for k in TIC_OPTIONS if k in args}
    if isinstance(
        options.get("window"), list
    ):  # a (k_h, k_w) pair read from JSON/YAML: hashable for the cache
        options["window"] = tuple(options["window"])
    img, patch = args["img_size"], args["patch_size"]
    side = (img if isinstance(img, int) else img[0]) // (patch if isinstance(patch, int) else patch[0])
    args["attn_layer"] = msa_conv_layer(train_grid=side, **options)
    return build_model_with_cfg(
        TiCVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=args["depth"] - 1, feature_cls="getter"),
        class_token=False,
        **args,
    )


@register_model
def vitkit_tic_nano_p4_16(pretrained: bool = False, **kwargs: Any) -> TiCVisionTransformer:
    """2-block, 32-wide TiC (MSA-Conv) ViT for unit tests (16x16 input, patch 4)."""
    return _build("vitkit_tic_nano_p4_16", "nano", pretrained, **kwargs)


@register_model
def vitkit_tic_micro_p4_16(pretrained: bool = False, **kwargs: Any) -> TiCVisionTransformer:
    """3-block, 64-wide TiC (MSA-Conv) ViT for 16x16 inputs, the match of vitkit_micro_p4_16."""
    return _build("vitkit_tic_micro_p4_16", "micro", pretrained, **kwargs)


@register_model
def vitkit_tic_tiny_p4_32(pretrained: bool = False, **kwargs: Any) -> TiCVisionTransformer:
    """7-block, 128-wide TiC (MSA-Conv) ViT for 32x32 inputs, the match of vitkit_tiny_p4_32."""
    return _build("vitkit_tic_tiny_p4_32", "tiny", pretrained, **kwargs)
