"""Quantization points of a ViT, found by module TYPE and structural role (never by name substring).

Per transformer block (a module whose child is a :class:`~vitkit.models.VitkitAttention`), the 8
activation points of the literature plus the weights:

    qkv input (post-LN1)  ·  q and k (the qk_matmul operands)  ·  softmax output  ·  v (av_matmul's
    second operand)  ·  proj input  ·  fc1 input (post-LN2)  ·  fc2 input (post-GELU)

and outside the blocks the patch-embedding convolution and the classifier(s) from timm's
``get_classifier()`` (both heads of a distilled model). Every other ``nn.Linear`` (added by other
transforms, e.g. extra heads) is a generic ``linear`` point, every other plain ``nn.Conv2d`` (a dense
head's decoder, a convolutional stem) a ``conv`` point: weights per output channel, input per tensor. Roles come from the structure: "the
``qkv`` Linear of a VitkitAttention", "the ``fc2`` of the block's Mlp"; the LayerNorm feeding qkv /
fc1 is recorded when the block is timm's pre-norm ``Block`` (needed for RepQ reparameterization).

This module also builds the quantized structure from a config (:func:`build_structure`): the same
function serves calibration and replay, so a reloaded run has exactly the calibrated modules.
"""

from __future__ import annotations

from dataclasses import dataclass

from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from vitkit.compress.quant.config import QuantConfig, point_bits
from vitkit.compress.quant.layers import QUANT_LAYERS, QuantConv2d, QuantLinear, QuantMatMul, QuantSoftmax
from vitkit.compress.quant.quantizers import (  # noqa: F401 - here for callers
    GELU_MIN,
    AdaLogQuantizer,
    Log2Quantizer,
    LogSqrt2Quantizer,
    Quantizer,
    ShiftLog2Quantizer,
    TanQuantizer,
    TwinUniformQuantizer,
    UniformQuantizer,
    quantizers,
    set_quantizers_enabled,
)
from vitkit.errors import VitkitError
from vitkit.models.attention import MatMul, Softmax, VitkitAttention

BLOCK_ROLES = ("qkv", "qk", "softmax", "av", "proj", "fc1", "fc2")
LINEAR_ROLES = ("patch_embed", "qkv", "proj", "fc1", "fc2", "head", "linear", "conv")  # the weighted ones


@dataclass
class QuantPoint:
    name: str  # qualified module name, e.g. "blocks.3.attn.qkv"
    role: str  # patch_embed | qkv | qk | softmax | av | proj | fc1 | fc2 | head | linear
    parent: nn.Module
    attr: str
    block: int | None = None  # index of the transformer block
    block_module: nn.Module | None = None
    norm: str | None = None  # qualified name of the LayerNorm feeding it (reparam-able), if any
    post_gelu: bool = False  # fc2 whose input is exactly GELU(fc1(x))
    heads: int = 1  # attention heads (q / k / v per-head quantizers)

    @property
    def module(self) -> nn.Module:
        return getattr(self.parent, self.attr)


def _parents(model: nn.Module) -> dict[int, tuple[str, nn.Module, str]]:
    """id(child) -> (child's qualified name, parent, attribute)."""
    out = {}
    for pname, parent in model.named_modules():
        for attr, child in parent.named_children():
            out[id(child)] = (f"{pname}.{attr}" if pname else attr, parent, attr)
    return out


def _is_gelu(m: nn.Module) -> bool:
    return isinstance(m, nn.GELU) or type(m).__name__ in ("GELU", "GELUTanh", "QuickGELU", "IntGELU")


def find_points(model: nn.Module) -> list[QuantPoint]:
    """All quantization points of ``model`` in forward order (patch embedding, blocks, heads, others)."""
    parents = _parents(model)
    points: list[QuantPoint] = []
    seen: set[int] = set()

    def add(module: nn.Module, role: str, **kw) -> None:
        if id(module) in seen or id(module) not in parents:
            return
        name, parent, attr = parents[id(module)]
        seen.add(id(module))
        points.append(QuantPoint(name, role, parent, attr, **kw))

    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if isinstance(proj, nn.Conv2d):
        add(proj, "patch_embed")
    # also by type: a dense model's ViT sits under `backbone`, ViT-P's two ViTs under their stages
    for pe in (m for m in model.modules() if isinstance(m, PatchEmbed)):
        if isinstance(pe.proj, nn.Conv2d):
            add(pe.proj, "patch_embed")

    attns = [m for m in model.modules() if isinstance(m, VitkitAttention)]
    for i, attn in enumerate(attns):
        block = parents[id(attn)][1]
        pre_norm = isinstance(block, Block) and getattr(block, "attn", None) is attn
        norm1 = block.norm1 if pre_norm and isinstance(block.norm1, nn.LayerNorm) else None
        kw = dict(block=i, block_module=block, heads=attn.num_heads)
        if isinstance(attn.qkv, nn.Linear):
            ok = norm1 is not None and attn.gate is None  # the LN must feed qkv alone
            add(attn.qkv, "qkv", norm=parents[id(norm1)][0] if ok else None, **kw)
        add(attn.qk_matmul, "qk", **kw)
        add(attn.softmax, "softmax", **kw)
        add(attn.av_matmul, "av", **kw)
        if isinstance(attn.proj, nn.Linear):
            add(attn.proj, "proj", **kw)
        mlp = getattr(block, "mlp", None)
        fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
        if isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear):
            norm2 = block.norm2 if pre_norm and isinstance(block.norm2, nn.LayerNorm) else None
            add(fc1, "fc1", norm=parents[id(norm2)][0] if norm2 is not None else None, **kw)
            plain = isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity)
            add(fc2, "fc2", post_gelu=_is_gelu(getattr(mlp, "act", None)) and plain, **kw)

    heads = model.get_classifier() if hasattr(model, "get_classifier") else ()
    for head in heads if isinstance(heads, tuple) else (heads,):
        if isinstance(head, nn.Linear):
            add(head, "head")
    for m in model.modules():
        if isinstance(m, nn.Linear) and not _inside_quant_layer(m, parents):
            add(m, "linear")
    # decoder convolutions (UperNet, ChangeViT), convolutional stems; exact types: a Conv2d subclass
    # (timm's StdConv2d standardises its weight in forward) would lose its behaviour in a QuantConv2d
    for m in model.modules():
        if type(m) in (nn.Conv2d, QuantConv2d) and not _inside_quant_layer(m, parents):
            add(m, "conv")
    return points


def built_points(model: nn.Module) -> list[QuantPoint]:
    """The points of an already-quantized structure: a weighted point left in float (one a saved run
    did not record: :func:`build_structure` ``only``) is not one."""
    return [
        p
        for p in find_points(model)
        if p.role not in LINEAR_ROLES or isinstance(p.module, (QuantLinear, QuantConv2d))
    ]


def _inside_quant_layer(m: nn.Module, parents) -> bool:
    entry = parents.get(id(m))
    return entry is not None and isinstance(entry[1], QUANT_LAYERS)


# -- building the quantized structure ----------------------------------------------------------
def _uniform(bits: int, cfg: QuantConfig, channels: int = 1, axis: int = -1) -> UniformQuantizer:
    return UniformQuantizer(bits, symmetric=cfg.spec.symmetric, channels=channels, axis=axis)


def _softmax_quantizer(bits: int, cfg: QuantConfig) -> Quantizer:
    kind = cfg.spec.softmax
    if kind == "uniform":
        return UniformQuantizer(bits, symmetric=False)  # probabilities are non-negative
    return {
        "log2": Log2Quantizer,
        "logsqrt2": LogSqrt2Quantizer,
        "adalog": AdaLogQuantizer,
        "twin": lambda b: TwinUniformQuantizer(b, "softmax"),
        "shiftlog2": ShiftLog2Quantizer,
        "tan": TanQuantizer,
    }[kind](bits)


def _gelu_quantizer(bits: int, cfg: QuantConfig, in_features: int) -> Quantizer:
    kind = cfg.spec.gelu
    if kind == "adalog":
        return AdaLogQuantizer(bits, shift=GELU_MIN)
    if kind == "twin":
        return TwinUniformQuantizer(bits, "gelu")
    return _act_quantizer(bits, cfg, in_features)


def _act_quantizer(bits: int, cfg: QuantConfig, in_features: int) -> UniformQuantizer:
    channels = in_features if cfg.a_granularity == "channel" else 1
    return _uniform(bits, cfg, channels=channels, axis=-1)


def _weight_quantizer(bits: int, cfg: QuantConfig, out_channels: int) -> UniformQuantizer:
    channels = out_channels if cfg.w_granularity == "channel" else 1
    return _uniform(bits, cfg, channels=channels, axis=0)


def build_structure(model: nn.Module, cfg: QuantConfig, only: set[str] | None = None) -> dict[str, dict]:
    """Swap every point's module for its quantized version (uncalibrated) and return the resolved
    ``{name: {"role", "w", "a"}}`` map. Integer-only ops (I-ViT) are installed by ``intonly``.
    ``only``: the points a saved run recorded (a run quantized before a kind of point existed, e.g. the
    decoder convolutions, keeps those in float)."""
    points = [p for p in find_points(model) if only is None or p.name in only]
    if not points:
        raise VitkitError(
            f"{type(model).__name__} has no quantization points (no Linear, attention or patch embedding)"
        )
    # Quantizers are built on the CPU; they join the model's device at the end (a model split over
    # several devices is left to the caller: its quantizers stay where they are built).
    devices = {t.device for t in [*model.parameters(), *model.buffers()]}
    resolved: dict[str, dict] = {}
    for p in points:
        bits = point_bits(cfg, p.name, p.role)
        resolved[p.name] = {"role": p.role, **bits}
        m = p.module
        if isinstance(m, QUANT_LAYERS):
            raise VitkitError(f"'{p.name}' is already quantized: the model was quantized before")
        a = bits["a"]
        if p.role in LINEAR_ROLES:
            if isinstance(m, nn.Conv2d):
                new = QuantConv2d(
                    m,
                    _weight_quantizer(bits["w"], cfg, m.out_channels),
                    UniformQuantizer(a, symmetric=cfg.spec.symmetric),
                )
            else:
                if p.role == "fc2" and p.post_gelu:
                    iq = _gelu_quantizer(a, cfg, m.in_features)
                else:
                    iq = _act_quantizer(a, cfg, m.in_features)
                folds = (p.norm is not None and (cfg.spec.reparam or cfg.smoothquant)) or (
                    p.role == "fc2" and p.post_gelu and cfg.spec.gelu == "adalog"
                )
                new = QuantLinear(m, _weight_quantizer(bits["w"], cfg, m.out_features), iq, ensure_bias=folds)
        elif p.role == "qk":
            _check_type(m, MatMul, p)
            heads = p.heads if cfg.spec.per_head else 1
            new = QuantMatMul(_uniform(a, cfg, heads, axis=1), _uniform(a, cfg, heads, axis=1))
        elif p.role == "av":
            _check_type(m, MatMul, p)
            heads = p.heads if cfg.spec.per_head else 1
            new = QuantMatMul(None, _uniform(a, cfg, heads, axis=1))
        elif p.role == "softmax":
            _check_type(m, Softmax, p)
            if cfg.spec.integer_ops:
                from vitkit.compress.quant.intonly import IntSoftmax

                new = IntSoftmax(output_bits=a, dim=m.dim)
            else:
                new = QuantSoftmax(_softmax_quantizer(a, cfg), dim=m.dim)
        else:  # pragma: no cover - roles are closed
            raise AssertionError(p.role)
        new.train(m.training)
        setattr(p.parent, p.attr, new)
    if cfg.spec.integer_ops:
        from vitkit.compress.quant.intonly import install_integer_ops

        install_integer_ops(model, points)
    if len(devices) == 1:
        model.to(devices.pop())
    return resolved


def _check_type(m: nn.Module, expected: type, p: QuantPoint) -> None:
    if type(m) is not expected:
        raise VitkitError(
            f"'{p.name}' is a {type(m).__name__}, not vitkit's {expected.__name__}: another transform replaced "
            "it; quantize before that transform or remove it"
        )
