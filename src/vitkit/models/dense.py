"""Dense-prediction models over any plain timm ViT: a feature pyramid from ``forward_intermediates``
and a head that turns it into per-pixel class logits at the input's size.

- ``linear`` head: the per-patch linear classifier of Strudel et al., "Segmenter: Transformer for
  Semantic Segmentation" (ICCV 2021) — a 1x1 convolution on the last block's normalised patch
  tokens, upsampled bilinearly. The baseline.
- ``upernet`` head: the UperNet decoder of Xiao et al., "Unified Perceptual Parsing for Scene
  Understanding" (ECCV 2018), as MMSegmentation's ``UPerHead`` builds it (pyramid pooling on the
  coarsest level, a top-down FPN, all levels fused at the finest), over a four-level pyramid:
  - ``pyramid=sfp``: the simple feature pyramid of Li et al., "Exploring Plain Vision Transformer
    Backbones for Object Detection" (ViTDet, ECCV 2022): only the last block's map, rescaled by
    4, 2, 1 and 1/2 (two stride-2 deconvolutions, one, none, a max-pool), each followed by a 1x1
    and a 3x3 convolution with LayerNorm;
  - ``pyramid=multilevel``: four evenly spaced blocks, the first rescaled by 4, the next by 2, 1
    and 1/2 (MMSegmentation's ``MultiLevelNeck`` for ViT + UperNet), with the same convolutions.
  Simplifications: ``channels`` defaults to the backbone width clamped to 32-256 (MMSegmentation
  uses 512 for ViT-B); the pyramid-pooling scales are those of (1, 2, 3, 6) that divide the
  coarsest map's side, so the pooling is exact and exports to ONNX.
- Change detection (:class:`ChangeModel`): the same encoder runs on both images of a pair (stacked
  on the channel axis, shared weights) and the head sees the absolute difference of the two
  pyramids, level by level: the siamese "difference" baseline of change detection.

The head is part of the model's manifest (``head`` in model.json, validated by
:class:`DenseHeadConfig`), rebuilt on load before the recorded transforms are replayed: a run is the
base ViT, its head, then its transforms.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from vitkit.errors import VitkitError
from vitkit.models.manifest import MANIFEST_ATTR, Manifest, get_manifest, set_manifest

_PPM_SCALES = (1, 2, 3, 6)
DETECTION_HEADS = ("fcos", "deformable-detr", "co-detr")
QUERY_HEADS = ("deformable-detr", "co-detr")  # DETRs: object queries
CO_HEADS = ("atss", "rcnn")  # Co-DETR's auxiliary one-to-many heads
STRIDES = (4, 8, 16, 32)  # the pyramid's levels in input pixels, as ViTDet / UperNet use them


class DenseHeadConfig(BaseModel):
    """The head of a dense model, as model.json records it (validated on load)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: Literal["segmentation", "change", "detection"] = "segmentation"
    head: Literal["linear", "upernet", "changevit", "vitp", "fcos", "deformable-detr", "co-detr"] = "upernet"
    pyramid: Literal["sfp", "multilevel"] = "sfp"
    num_classes: int = Field(gt=1, le=255)
    channels: int = Field(gt=0, le=4096)
    indices: list[int] = Field(min_length=1, max_length=4)  # backbone blocks feeding the head
    in_chans: int = Field(gt=0, le=64)  # channels of one image (a change pair has twice as many)
    ppm_scales: list[int] = Field(default_factory=list, max_length=8)
    scales: list[float] = Field(default_factory=list, max_length=4)  # pyramid levels / patch grid
    detail_channels: list[int] = Field(default_factory=list, max_length=3)  # changevit's CNN widths
    # vitp (models/vitp.py): points per ViT-P chunk, fusion weight, and the stage-1 segmenter's head
    points: int = Field(0, ge=0, le=4096)
    alpha: float = Field(0.4, ge=0.0, le=1.0)
    stage1: DenseHeadConfig | None = None
    queries: int = Field(0, ge=0, le=1000)  # deformable-detr's and co-detr's object queries
    co_heads: list[Literal["atss", "rcnn"]] = Field(default_factory=list, max_length=2)  # co-detr's

    @model_validator(mode="after")
    def _detection(self) -> DenseHeadConfig:
        detector = self.head in DETECTION_HEADS
        if detector != (self.task == "detection"):
            raise ValueError(
                f"detection takes a detector head ({', '.join(DETECTION_HEADS)}) and only detection does"
            )
        if detector and self.channels % 32:
            raise ValueError(f"head {self.head} takes channels divisible by 32, got {self.channels}")
        if (self.head in QUERY_HEADS) != (self.queries > 0):
            raise ValueError(f"heads {' and '.join(QUERY_HEADS)} take queries >= 1, and only they do")
        if (self.head == "co-detr") != bool(self.co_heads) or len(set(self.co_heads)) != len(self.co_heads):
            raise ValueError(
                "head co-detr takes one or both co_heads (atss, rcnn), and only it takes co_heads"
            )
        return self

    @model_validator(mode="after")
    def _vitp(self) -> DenseHeadConfig:
        if self.head != "vitp":
            if self.stage1 is not None:
                raise ValueError(f"head {self.head} takes no stage1 (only vitp does)")
            return self
        if self.task != "segmentation":
            raise ValueError("head vitp is a segmentation head (task segmentation)")
        s = self.stage1
        if s is None or s.head == "vitp" or s.task != "segmentation" or s.num_classes != self.num_classes:
            raise ValueError("head vitp takes the stage1 head of a one-stage segmenter with the same classes")
        if self.points < 1:
            raise ValueError("head vitp takes points >= 1 (points per ViT-P chunk)")
        return self

    @model_validator(mode="after")
    def _changevit(self) -> DenseHeadConfig:
        if self.head == "changevit":
            if self.task != "change":
                raise ValueError("head changevit is a change-detection head (task change)")
            if len(self.detail_channels) != 3 or any(c % 4 or c > 2048 for c in self.detail_channels):
                raise ValueError("head changevit takes three detail_channels, each a multiple of 4")
        return self

    @model_validator(mode="after")
    def _scales(self) -> DenseHeadConfig:
        bad = [s for s in self.scales if s not in (4.0, 2.0, 1.0, 0.5, 0.25, 0.125)]
        if bad:
            raise ValueError(f"pyramid scale {bad[0]} is not one of 4, 2, 1, 1/2, 1/4, 1/8")
        if self.head in ("upernet", *DETECTION_HEADS) and (
            len(self.scales) < 2 or (self.pyramid == "multilevel" and len(self.scales) != 4)
        ):
            raise ValueError(
                f"head {self.head} with pyramid {self.pyramid} takes 2-4 pyramid scales (4 for multilevel)"
            )
        return self

    @model_validator(mode="after")
    def _levels(self) -> DenseHeadConfig:
        want = 1 if self.head == "linear" or self.pyramid == "sfp" else 4
        if len(self.indices) != want:
            raise ValueError(f"head {self.head} with pyramid {self.pyramid} takes {want} block indices")
        return self


def _vit_parts(model: nn.Module) -> tuple[int, tuple[int, int], int]:
    """(width, patch grid, depth) of a plain ViT, or a one-line error."""
    blocks = getattr(model, "blocks", None)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    width = getattr(model, "embed_dim", None) or getattr(model, "num_features", None)
    if not hasattr(model, "forward_intermediates") or blocks is None or grid is None or not width:
        raise VitkitError(
            f"dense heads need a plain timm ViT (blocks, patch_embed.grid_size, forward_intermediates); "
            f"{type(model).__name__} has no patch grid"
        )
    return int(width), (int(grid[0]), int(grid[1])), len(blocks)


def default_head_config(
    model: nn.Module,
    num_classes: int,
    *,
    task: str = "segmentation",
    head: str = "upernet",
    pyramid: str = "sfp",
    channels: int | None = None,
    detail_width: int = 64,
    queries: int = 50,
    co_heads: tuple[str, ...] = CO_HEADS,
) -> DenseHeadConfig:
    """The head config for ``model``: block indices (last block; or four evenly spaced ones for the
    multi-level pyramid), channels, pooling scales."""
    from vitkit.models.factory import model_input_size

    width, grid, depth = _vit_parts(model)
    patch = model_input_size(model)[1] // grid[0]
    scales = [patch / s for s in STRIDES if min(grid) * patch / s >= 1 and patch / s in _RESCALE]
    if head == "changevit":
        if task != "change":
            raise VitkitError("head 'changevit' is for the change task (--task change)")
        if width % 8:
            raise VitkitError(f"head 'changevit' needs a ViT width divisible by 8 (8 heads); {width} is not")
    if head in ("linear", "changevit") or pyramid == "sfp":
        indices = [depth - 1]
    else:
        if depth < 4 or len(scales) < 4:
            raise VitkitError(
                f"pyramid 'multilevel' takes four blocks at four strides; the model has {depth} blocks and a "
                f"{grid[0]}x{grid[1]} patch grid (use pyramid=sfp)"
            )
        indices = [round((i + 1) * depth / 4) - 1 for i in range(4)]
    coarsest = [int(g * min(scales)) for g in grid] if scales else [0, 0]
    pyramid_head = head in ("upernet", *DETECTION_HEADS)
    if pyramid_head and len(scales) < 2:  # changevit and linear need no pyramid
        raise VitkitError(
            f"head '{head}' needs a pyramid of at least two levels; a {grid[0]}x{grid[1]} patch grid of "
            f"{patch} px patches has {len(scales)} (use head=linear or a larger input)"
        )
    return validated_head_config(
        dict(
            task=task,
            head=head,
            pyramid=pyramid,
            num_classes=num_classes,
            # detectors: FCOS's GroupNorm(32) and DETR's heads need a multiple of 32
            channels=channels
            or (min(256, max(32, width)) // 32 * 32 if head in DETECTION_HEADS else min(256, max(32, width))),
            indices=indices,
            in_chans=model_input_size(model)[0],
            ppm_scales=[s for s in _PPM_SCALES if all(c % s == 0 for c in coarsest)]
            if head == "upernet"
            else [],
            scales=scales if pyramid_head else [],
            detail_channels=[detail_width, 2 * detail_width, 4 * detail_width] if head == "changevit" else [],
            queries=queries if head in QUERY_HEADS else 0,
            co_heads=list(co_heads) if head == "co-detr" else [],
        ),
        "head",
    )


def validated_head_config(config: dict[str, Any] | DenseHeadConfig, where: str) -> DenseHeadConfig:
    if isinstance(config, DenseHeadConfig):
        return config
    try:
        return DenseHeadConfig(**config)
    except (ValidationError, TypeError) as e:
        from vitkit.registry import format_validation_error

        reason = format_validation_error(e, where) if isinstance(e, ValidationError) else f"{where}: {e}"
        raise VitkitError(reason) from e


# -- building blocks -----------------------------------------------------------------------------
def _conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


_RESCALE = (4.0, 2.0, 1.0, 0.5, 0.25, 0.125)


def _rescale(width: int, scale: float) -> tuple[nn.Module, int]:
    """ViTDet's rescaling branch: (module, its output width); coarser than 1/2 pools further."""
    from timm.layers import LayerNorm2d

    if scale == 4.0:
        return (
            nn.Sequential(
                nn.ConvTranspose2d(width, width // 2, 2, stride=2),
                LayerNorm2d(width // 2),
                nn.GELU(),
                nn.ConvTranspose2d(width // 2, width // 4, 2, stride=2),
            ),
            width // 4,
        )
    if scale == 2.0:
        return nn.ConvTranspose2d(width, width // 2, 2, stride=2), width // 2
    if scale == 1.0:
        return nn.Identity(), width
    return nn.MaxPool2d(round(1 / scale)), width


class FeaturePyramid(nn.Module):
    """Levels at strides 4-32 px from one map (``sfp``) or one map per level (``multilevel``)."""

    def __init__(self, width: int, channels: int, levels_in: int, scales: list[float]):
        super().__init__()
        from timm.layers import LayerNorm2d

        self.levels_in = levels_in
        self.rescale = nn.ModuleList()
        self.out = nn.ModuleList()
        for scale in scales:
            branch, w = _rescale(width, scale)
            self.rescale.append(branch)
            self.out.append(
                nn.Sequential(
                    nn.Conv2d(w, channels, 1, bias=False),
                    LayerNorm2d(channels),
                    nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                    LayerNorm2d(channels),
                )
            )

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        src = maps * len(self.rescale) if self.levels_in == 1 else maps
        return [out(branch(x)) for x, branch, out in zip(src, self.rescale, self.out)]


class UperHead(nn.Module):
    """UperNet (Xiao et al. 2018) as MMSegmentation's UPerHead: PPM + FPN + fusion + 1x1 classifier."""

    def __init__(
        self,
        channels: int,
        num_classes: int,
        ppm_scales: list[int],
        coarsest: tuple[int, int],
        levels: int = 4,
    ):
        super().__init__()
        # Adaptive pooling to s x s written as a fixed average pool: the scales divide the coarsest map
        # (default_head_config), where the two are the same, and only the fixed one exports to ONNX.
        self.ppm = nn.ModuleList(
            nn.Sequential(
                nn.AvgPool2d((coarsest[0] // s, coarsest[1] // s)), _conv_bn_relu(channels, channels, 1)
            )
            for s in ppm_scales
        )
        self.bottleneck = _conv_bn_relu(channels * (1 + len(ppm_scales)), channels, 3)
        self.lateral = nn.ModuleList(_conv_bn_relu(channels, channels, 1) for _ in range(levels - 1))
        self.fpn = nn.ModuleList(_conv_bn_relu(channels, channels, 3) for _ in range(levels - 1))
        self.fuse = _conv_bn_relu(channels * levels, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        pooled = [_resize(p(top), top.shape[-2:]) for p in self.ppm]
        laterals = [lat(f) for lat, f in zip(self.lateral, feats[:-1])]
        laterals.append(self.bottleneck(torch.cat([top, *pooled], 1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0], *(_resize(o, size) for o in outs[1:])], 1))
        return self.classifier(self.dropout(fused))


class LinearHead(nn.Module):
    """Segmenter's linear decoder: one 1x1 convolution on the patch grid."""

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.classifier(feats[-1])


def _resize(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


# -- the models ----------------------------------------------------------------------------------
class DenseModel(nn.Module):
    """(B, C, H, W) images -> (B, K, H, W) per-pixel class logits: ViT backbone, pyramid, head."""

    def __init__(self, backbone: nn.Module, config: DenseHeadConfig):
        super().__init__()
        width, grid, _ = _vit_parts(backbone)
        self.config = config
        self.backbone = backbone
        self.num_classes = config.num_classes
        self.num_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 0))
        self.pyramid_encoder: nn.Module | None = None  # set by transforms that build the pyramid
        if config.head == "changevit":
            from vitkit.models.changevit import ChangeDecoder, DetailCapture

            c2, c3, c4 = config.detail_channels
            self.neck: nn.Module = nn.Identity()
            self.detail = DetailCapture(config.in_chans, (c2, c3, c4))
            self.decode_head: nn.Module = ChangeDecoder((c2, c3, c4, width))
        elif config.head == "linear":
            self.neck = nn.Identity()
            self.decode_head = LinearHead(width, config.num_classes)
        else:
            self.neck = FeaturePyramid(width, config.channels, len(config.indices), config.scales)
            coarsest = (int(grid[0] * min(config.scales)), int(grid[1] * min(config.scales)))
            if any(c % k for c in coarsest for k in config.ppm_scales):
                raise VitkitError(
                    f"head ppm_scales {config.ppm_scales} must divide the coarsest map {coarsest[0]}x{coarsest[1]}"
                )
            self.decode_head = UperHead(
                config.channels, config.num_classes, config.ppm_scales, coarsest, len(config.scales)
            )
        from vitkit.models.factory import model_input_size

        # what model_input_size / model_normalization read: the backbone's input, as it is built
        self.pretrained_cfg = dict(getattr(backbone, "pretrained_cfg", {}) or {})
        self.pretrained_cfg["input_size"] = model_input_size(backbone)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter groups of the backbone (layer-wise LR decay), under ``backbone.``."""
        return prefixed_group_matcher(self.backbone, "backbone.", coarse)

    def backbone_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The chosen blocks' outputs as (B, D, h, w) maps (normalised by the final norm, as timm's
        ``forward_intermediates(norm=True)`` gives them)."""
        return self.backbone.forward_intermediates(
            x, indices=list(self.config.indices), norm=True, output_fmt="NCHW", intermediates_only=True
        )

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The pyramid the head reads (one map for the linear head). A transform may replace how it
        is made (``pyramid_encoder``: e.g. ViT-CoMer, which runs the backbone's blocks between its
        own interactions): then ``pyramid_encoder(self.backbone, x)`` gives it."""
        if self.pyramid_encoder is not None:
            return self.pyramid_encoder(self.backbone, x)
        maps = self.backbone_features(x)
        return maps if isinstance(self.neck, nn.Identity) else self.neck(maps)

    def pyramid_sizes(self) -> list[tuple[int, int]]:
        """(h, w) of each level the head reads, at the model's input size."""
        grid = self.backbone.patch_embed.grid_size
        if not self.config.scales:
            return [(int(grid[0]), int(grid[1]))]
        return [(int(grid[0] * s), int(grid[1] * s)) for s in self.config.scales]

    def decode(self, feats: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return _resize(self.decode_head(feats), size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.features(x), tuple(x.shape[-2:]))


class ChangeModel(DenseModel):
    """(B, 2C, H, W) image pairs -> (B, 2, H, W) change logits: a siamese encoder (shared weights)
    and the head on the absolute difference of the two pyramids."""

    def __init__(self, backbone: nn.Module, config: DenseHeadConfig):
        super().__init__(backbone, config)
        _, h, w = self.pretrained_cfg.get("input_size", (config.in_chans, 224, 224))
        self.pretrained_cfg["input_size"] = (2 * config.in_chans, h, w)

    def dates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two images of a pair stacked on channels (the first date's channels, then the second's)."""
        c = self.config.in_chans
        if x.shape[1] != 2 * c:
            raise ValueError(f"expected image pairs with {2 * c} channels (2 x {c}), got {x.shape[1]}")
        return x[:, :c], x[:, c:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.dates(x)
        # two passes rather than one over the concatenated batch: slicing that batch in half would trace
        # its size as a constant and the ONNX graph could not take another batch size
        before, after = self.features(a), self.features(b)
        diff = [(f - g).abs() for f, g in zip(before, after)]
        return self.decode(diff, tuple(x.shape[-2:]))


class ChangeViTModel(ChangeModel):
    """ChangeViT (Zhu et al. 2024; ``vitkit.models.changevit``): ViT + detail-capture CNN per date,
    feature injector, difference decoder. Outputs ``[0, z]`` per pixel (z: the change score before
    the sigmoid), so argmax is the official threshold sigmoid(z) > 0.5."""

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [*self.detail(x), self.backbone_features(x)[-1]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.dates(x)
        z = _resize(self.decode_head(self.encode(a), self.encode(b)), tuple(x.shape[-2:]))
        return torch.cat([torch.zeros_like(z), z], 1)


def attach_dense_head(model: nn.Module, config: DenseHeadConfig | dict[str, Any]) -> DenseModel:
    """Wrap a plain ViT (no classifier) into a dense model; the manifest moves to the wrapper and
    records the head, so ``vitkit.load`` rebuilds it."""
    config = validated_head_config(config, "model.json 'head'")
    if config.head == "vitp":
        raise VitkitError(
            "head vitp wraps a stage-1 segmenter: build it with vitkit.models.heads.attach_head"
        )
    cls = (
        ChangeViTModel
        if config.head == "changevit"
        else ChangeModel
        if config.task == "change"
        else DenseModel
    )
    return wrap_in_head(model, config, cls)


def wrap_in_head(model: nn.Module, config: DenseHeadConfig, cls: Any) -> Any:
    """``cls(model, config)`` around a plain ViT whose classifier is dropped; the manifest moves to the
    wrapper and records the head, so ``vitkit.load`` rebuilds it (dense heads, the detectors)."""
    manifest = get_manifest(model)
    if getattr(model, "num_classes", 0):
        model.reset_classifier(0)
        if manifest is not None:
            manifest.kwargs["num_classes"] = 0
    out = cls(model, config)
    if manifest is not None:
        model.__dict__.pop(MANIFEST_ATTR, None)  # one manifest, on the outermost model
        set_manifest(
            out, Manifest(manifest.name, manifest.kwargs, manifest.transforms, head=config.model_dump())
        )
    return out


def prefixed_group_matcher(vit: nn.Module, prefix: str, coarse: bool = False) -> dict[str, Any]:
    """timm's parameter groups of ``vit`` (layer-wise LR decay) for a wrapper that holds it under
    ``prefix`` (e.g. ``backbone.``); the wrapper's other parameters match no group, so timm puts them
    in the last one (no decay), as MMSegmentation's layer decay treats a decoder."""
    escaped = re.escape(prefix)

    def fix(pattern: str) -> str:
        return "^" + escaped + "(?:" + pattern.removeprefix("^") + ")"

    out: dict[str, Any] = {}
    for key, value in vit.group_matcher(coarse).items():
        out[key] = fix(value) if isinstance(value, str) else [(fix(pat), layer) for pat, layer in value]
    return out
