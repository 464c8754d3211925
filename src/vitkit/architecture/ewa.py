"""Experts Weights Averaging (EWA): train with MoE feed-forwards, infer with a plain ViT.

Paper: Huang et al., "Experts Weights Averaging: A New General Training Scheme for Vision
Transformers" (arXiv 2308.06093, 2023). **No public code was found: this is our reading of the
paper's abstract and method description; the points marked [verify] are our choices.**

What it changes: during training, some FFNs (timm ``Mlp``) become a mixture of N experts, each a
copy of that FFN (so they start identical). Tokens reach experts by *random uniform partition*: per
sample the tokens are randomly permuted and cut into N equal groups, group j going to expert j (no
router, no balance loss: the compute of one FFN). After every optimizer step each expert is pulled
towards the others (EWA, share rate β)

    E_i <- (1 - β) E_i + β / (N - 1) · Σ_{j≠i} E_j          (keeps the experts' mean) [verify]

applied to every weight and bias, outside autograd, by the training-loop callback
:class:`EWAAveraging` (``fit(..., callbacks=[EWAAveraging()])``, any objective). After training every MoE
is converted back into one FFN whose weights are the experts' mean (:func:`merge_ewa`): the model is
the original ViT again, same parameter count and inference cost. In eval mode an MoE already
computes exactly that averaged FFN, so per-epoch validation measures the model that will be kept.

Our choices [verify]: MoE in every ``every``-th FFN counting from the first (default 2: blocks 1, 3,
5, ...), N = 4 experts, β = 0.3; all tokens (prefix tokens included) are partitioned; the partition
uses torch's global generator (seeded by the run). Optimizer state stays per expert.
"""

from __future__ import annotations

import copy

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from timm.layers import Mlp
from torch import nn
from torch.func import functional_call

from vitkit.errors import VitkitError
from vitkit.models import record_transform
from vitkit.registry import AS_IS, Technique, TrainTransform, parse_config, prepare_with, register
from vitkit.train.callbacks import Callback, TrainContext


class EWAConfig(BaseModel):
    """Options of :func:`apply_ewa` (``--transform ewa:experts=4,share=0.3,every=2``)."""

    model_config = ConfigDict(extra="forbid")

    experts: int = Field(4, ge=1, le=64, description="experts per MoE layer")
    share: float = Field(0.3, description="EWA share rate β in [0, 1] [verify the paper's default]")
    every: int = Field(2, ge=1, description="an MoE in every `every`-th FFN (1 = all)")
    layers: list[int] | None = Field(None, description="explicit FFN indices (overrides `every`)")

    @field_validator("share")
    @classmethod
    def _share_in_unit_interval(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("the share rate must be in [0, 1]")
        return v


class EWAMoE(nn.Module):
    """N copies of one FFN; random uniform partition of tokens in training, averaged FFN in eval."""

    def __init__(self, ffn: nn.Module, experts: int, share: float):
        super().__init__()
        self.experts = nn.ModuleList(copy.deepcopy(ffn) for _ in range(experts))
        self.share = float(share)

    def averaged_parameters(self) -> dict[str, torch.Tensor]:
        """The experts' mean, name by name (what the merged FFN holds)."""
        names = [n for n, _ in self.experts[0].named_parameters()]
        params = [dict(e.named_parameters()) for e in self.experts]
        return {n: torch.stack([p[n] for p in params]).mean(0) for n in names}

    def partition(self, batch: int, tokens: int, device: torch.device) -> torch.Tensor:
        """(batch, tokens) expert index: a random permutation of each sample cut into N equal groups."""
        n = len(self.experts)
        order = torch.rand(batch, tokens, device=device).argsort(dim=1)
        group_of_position = torch.arange(tokens, device=device) * n // tokens
        groups = torch.empty_like(order)
        groups.scatter_(1, order, group_of_position.expand(batch, tokens))
        return groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or len(self.experts) == 1:
            return functional_call(self.experts[0], self.averaged_parameters(), (x,))
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        groups = self.partition(shape[0], flat.shape[0] // shape[0], x.device).reshape(-1)
        index, outputs = [], []
        for e, expert in enumerate(self.experts):
            idx = (groups == e).nonzero().squeeze(1)
            index.append(idx)
            outputs.append(expert(flat[idx]))
        out = torch.cat(outputs)[torch.cat(index).argsort()]  # back to token order
        return out.reshape(*shape[:-1], out.shape[-1])

    @torch.no_grad()
    def average_(self) -> None:
        """One EWA step in place: E_i <- (1-β) E_i + β/(N-1) Σ_{j≠i} E_j (the mean is unchanged)."""
        n = len(self.experts)
        if n == 1 or self.share == 0:
            return
        params = [dict(e.named_parameters()) for e in self.experts]
        for name in params[0]:
            stacked = torch.stack([p[name] for p in params])
            total = stacked.sum(0)
            new = (1 - self.share) * stacked + self.share / (n - 1) * (total - stacked)
            for i, p in enumerate(params):
                p[name].copy_(new[i])

    def merged(self) -> nn.Module:
        """One FFN holding the experts' mean (the conversion for inference)."""
        ffn = copy.deepcopy(self.experts[0])
        with torch.no_grad():
            for name, value in self.averaged_parameters().items():
                ffn.get_parameter(name).copy_(value)
        return ffn.train(self.training)

    def extra_repr(self) -> str:
        return f"experts={len(self.experts)}, share={self.share}"


def ewa_layers(model: nn.Module) -> list[EWAMoE]:
    return [m for m in model.modules() if isinstance(m, EWAMoE)]


def _ffns(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) for every timm ``Mlp`` (exact type), in forward order."""
    out = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is Mlp:
                out.append((parent, name, child))
    return out


def apply_ewa(model: nn.Module, cfg: EWAConfig | dict | None = None) -> nn.Module:
    """Replace the chosen FFNs by :class:`EWAMoE` layers (experts copied from each FFN), in place.

    Train with the :class:`EWAAveraging` callback (or call :func:`ewa_step` after every optimizer step), then
    :func:`merge_ewa`. Raises :class:`VitkitError` on a model without timm ``Mlp`` FFNs (e.g. DHVT's
    DAFF) or on layer indices that do not exist.
    """
    cfg = parse_config(EWAConfig, cfg, "ewa")
    if ewa_layers(model):
        raise VitkitError("ewa: the model already has EWA mixture-of-experts layers")
    ffns = _ffns(model)
    if not ffns:
        raise VitkitError(
            f"ewa: {type(model).__name__} has no timm Mlp feed-forward layers to turn into experts "
            "(EWA needs a ViT whose blocks use timm's Mlp; DHVT's DAFF and SwiGLU FFNs are not supported)"
        )
    if cfg.layers is not None:
        bad = [i for i in cfg.layers if not 0 <= i < len(ffns)]
        if bad:
            raise VitkitError(f"ewa: option 'layers': {bad} out of range, the model has {len(ffns)} FFNs")
        chosen = sorted(set(cfg.layers))
    else:
        chosen = [i for i in range(len(ffns)) if i % cfg.every == cfg.every - 1]
    if not chosen:
        raise VitkitError(f"ewa: every={cfg.every} selects none of the model's {len(ffns)} FFNs")
    for i in chosen:
        parent, name, ffn = ffns[i]
        setattr(parent, name, EWAMoE(ffn, cfg.experts, cfg.share).train(ffn.training))
    record_transform(model, "ewa", {**cfg.model_dump(), "chosen": chosen})
    return model


def ewa_step(model: nn.Module) -> int:
    """One EWA step on every MoE layer of ``model`` (after an optimizer step); returns how many."""
    layers = ewa_layers(model)
    for layer in layers:
        layer.average_()
    return len(layers)


def merge_ewa(model: nn.Module) -> nn.Module:
    """Convert every EWA MoE back into one FFN holding the experts' mean, in place; returns the model.

    The merged model has the architecture (and parameter count) of the model before
    :func:`apply_ewa`, and computes exactly what the MoE model computes in eval mode.
    """
    if not ewa_layers(model):
        raise VitkitError("ewa: the model has no EWA mixture-of-experts layers to merge")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, EWAMoE):
                setattr(parent, name, child.merged())
    record_transform(model, "ewa_merge", {})
    return model


class EWAAveraging(Callback):
    """The training-loop callback: one EWA step on every MoE layer after every optimizer step (under
    no_grad, on the unwrapped model, before the EMA sees the weights; alike on every DDP process)."""

    def after_optimizer_step(self, ctx: TrainContext) -> None:
        ewa_step(ctx.model)


def replay_ewa(model: nn.Module, config: dict) -> nn.Module:
    """``vitkit.load``: the MoE layers (expert values come from model.safetensors)."""
    config = dict(config)
    chosen = config.pop("chosen", None)
    if chosen is not None:
        config["layers"] = chosen
    return apply_ewa(model, config)


def replay_ewa_merge(model: nn.Module, config: dict) -> nn.Module:
    return merge_ewa(model)


def train_transform(options: dict[str, str]) -> TrainTransform:
    """``vitkit train --transform ewa:experts=4,share=0.3,every=2``: MoE for training, averaged after
    every update, merged back into a plain ViT before evaluation and saving."""
    cfg = parse_config(EWAConfig, options, "ewa")
    return TrainTransform(
        apply=lambda model: apply_ewa(model, cfg),
        callbacks=lambda: [EWAAveraging()],
        finalize=merge_ewa,
    )


register(
    Technique(
        name="ewa",
        summary="train some FFNs as averaged mixtures of experts; merged back into a plain ViT",
        paper='Huang et al., "Experts Weights Averaging: A New General Training Scheme for Vision Transformers" (2023)',
        config=EWAConfig,
        replay=replay_ewa,
        export=prepare_with(merge_ewa, settled_by="ewa_merge"),
        train=train_transform,
        family="architecture",
        verb="vitkit train --transform ewa:experts=4",
    )
)
register(
    Technique(
        name="ewa_merge",
        summary="EWA's experts averaged into one FFN (the deployable form of an ewa model)",
        paper='Huang et al., "Experts Weights Averaging: A New General Training Scheme for Vision Transformers" (2023)',
        replay=replay_ewa_merge,
        export=AS_IS,
        requires=("ewa",),
        family="architecture",
        verb="(applied by --transform ewa after training)",
    )
)
