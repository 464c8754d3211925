"""A CLIP-style image-text model: any vitkit/timm ViT as the image tower, open_clip's text transformer
as the text tower, and CLIP's learned temperature — Radford et al., "Learning Transferable Visual
Models From Natural Language Supervision" (2021), as open-clip-torch builds it.

The image tower is a plain timm model whose classifier (``num_classes = embed_dim``) is the image
projection, as open_clip's ``TimmModel`` projects pooled timm features with one linear layer; so the
tower is a timm ViT that every classification-side technique (LoRA, quantization, ToMe, export)
takes as it is, and ``vitkit finetune`` re-heads it for labels. The text tower is
``open_clip.transformer.TextTransformer`` (causal mask, the end-of-text token pooled, a linear
projection), built from its config with no weights downloaded; captions are tokenized with
open_clip's ``SimpleTokenizer`` (the BPE vocabulary ships inside the wheel).

``forward(images)`` returns the L2-normalised image embedding (what prediction, export and the image
tower's consumers see); ``forward(images, tokens)`` returns ``(image_emb, text_emb, logit_scale)``
for the contrastive loss (one forward, so DDP sees every parameter used).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from vitkit.errors import VitkitError
from vitkit.models.manifest import MANIFEST_ATTR, Manifest, get_manifest, set_manifest

#: open_clip's BPE vocabulary (SimpleTokenizer): 49,408 tokens, start/end of text included
VOCAB_SIZE = 49408


class ClipHeadConfig(BaseModel):
    """The text tower and projection of an image-text run, as model.json records it ("head")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    head: Literal["clip"] = "clip"
    task: Literal["image-text"] = "image-text"
    embed_dim: int = Field(gt=0, le=4096)
    context_length: int = Field(gt=1, le=512)
    width: int = Field(gt=0, le=4096)
    heads: int = Field(gt=0, le=64)
    layers: int = Field(gt=0, le=48)
    init_temperature: float = Field(0.07, gt=0, le=10)


def validated_clip_config(config: dict[str, Any] | ClipHeadConfig, where: str) -> ClipHeadConfig:
    from vitkit.registry import parse_config

    if not isinstance(config, dict | ClipHeadConfig):
        raise VitkitError(f"{where}: expected an object, got {type(config).__name__}")
    return parse_config(ClipHeadConfig, config, where)


def build_text_tower(config: ClipHeadConfig) -> nn.Module:
    from open_clip.transformer import TextTransformer

    if config.width % config.heads:
        raise VitkitError(f"text tower: width {config.width} is not divisible by heads {config.heads}")
    return TextTransformer(
        context_length=config.context_length,
        vocab_size=VOCAB_SIZE,
        width=config.width,
        heads=config.heads,
        layers=config.layers,
        output_dim=config.embed_dim,
    )


class ImageTextModel(nn.Module):
    """``visual`` (a timm ViT whose head projects to ``embed_dim``), ``text`` (open_clip's text
    transformer) and ``logit_scale`` (log of 1 / temperature, learned, clamped at 100 as CLIP does)."""

    def __init__(self, visual: nn.Module, config: ClipHeadConfig):
        super().__init__()
        self.visual = visual
        self.text = build_text_tower(config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))
        self.config = config
        # what input and normalization the image tower expects, for vitkit's image pipeline
        from vitkit.models.factory import model_input_size

        self.num_prefix_tokens = int(getattr(visual, "num_prefix_tokens", 0))
        self.pretrained_cfg = dict(getattr(visual, "pretrained_cfg", {}) or {})
        self.pretrained_cfg["input_size"] = model_input_size(visual)

    @property
    def backbone(self) -> nn.Module:
        """The image tower (the name the task-head wrappers use for their ViT)."""
        return self.visual

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(images), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(tokens), dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor | None = None):
        image_emb = self.encode_image(images)
        if tokens is None:
            return image_emb
        # CLIP clamps the scale at 100 (temperature 0.01) so training stays stable
        return image_emb, self.encode_text(tokens), self.logit_scale.clamp(max=math.log(100)).exp()

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        from vitkit.models.dense import prefixed_group_matcher

        return prefixed_group_matcher(self.visual, "visual.", coarse)

    def no_weight_decay(self) -> set[str]:
        inner = getattr(self.visual, "no_weight_decay", lambda: set())()
        return {f"visual.{n}" for n in inner} | {"logit_scale"}


def attach_clip_head(model: nn.Module, config: ClipHeadConfig | dict[str, Any]) -> ImageTextModel:
    """Make a timm ViT the image tower of an image-text model: its classifier becomes the
    ``embed_dim`` projection, the text tower is new; the manifest moves to the wrapper and records
    the head, so ``vitkit.load`` rebuilds it."""
    config = validated_clip_config(config, "model.json 'head'")
    manifest = get_manifest(model)
    if getattr(model, "num_classes", None) != config.embed_dim:
        model.reset_classifier(config.embed_dim)
        if manifest is not None:
            manifest.kwargs["num_classes"] = config.embed_dim
    out = ImageTextModel(model, config)
    if manifest is not None:
        model.__dict__.pop(MANIFEST_ATTR, None)  # one manifest, on the outermost model
        set_manifest(
            out, Manifest(manifest.name, manifest.kwargs, manifest.transforms, head=config.model_dump())
        )
    return out
