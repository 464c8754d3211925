"""DIMAP — He & Zhou, "Data-independent Module-aware Pruning for Hierarchical Vision Transformers",
ICLR 2024. There is no public code (the repository holds a README only): this is our reading of the
paper.

Changes the model: every transformer-block linear gets an unstructured 0/1 mask. Weights are
scored without data, *within their module*: ``Imp(w_p) = w_p² / Σ_{i ≤ p} w_i²`` with the module's
weights sorted by decreasing magnitude (so the largest weight of each module scores 1 and the score
falls with |w|: LAMP's score computed per module), then ONE global threshold removes the lowest
``sparsity`` fraction of all scored weights. Ranking within modules keeps the comparison fair
between modules whose weights have different scales.

Our reading for a plain (one-stage) ViT: the paper's modules are QKV-M, PRJ-M, MLP-M per stage of a
hierarchical Swin; here a "stage" is a group of ``blocks_per_module`` consecutive blocks (default 1),
giving per group one QKV module (``qkv``), one PRJ module (``proj``) and one MLP module (``fc1`` and
``fc2`` together). The AUX modules (patch embedding, classifier) are left dense. Unstructured
sparsity gives no CPU speed: a DIMAP model is reported by sparsity and sparse FLOPs only.
``scores='magnitude'`` (one global |w| threshold) is the baseline DIMAP is compared with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from vitkit.compress.prune.masked import prunable_linears, use_masked_linears
from vitkit.errors import VitkitError
from vitkit.models import record_transform
from vitkit.registry import AS_IS, Technique, register


@dataclass
class DIMAPConfig:
    """``sparsity``: fraction of block-linear weights removed, in (0, 1)."""

    sparsity: float = 0.5
    blocks_per_module: int = 1
    scores: str = "dimap"

    def to_dict(self) -> dict:
        return asdict(self)


def module_scores(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """DIMAP scores of the weights of ONE module (several tensors ranked together), same shapes."""
    flat = torch.cat([w.detach().double().flatten() for w in weights])
    sq = flat**2
    order = sq.argsort(descending=True)
    cum = sq[order].cumsum(0)
    score = torch.empty_like(sq)
    score[order] = torch.where(cum > 0, sq[order] / cum.clamp_min(1e-300), torch.ones_like(cum))
    out, start = [], 0
    for w in weights:
        out.append(score[start : start + w.numel()].reshape(w.shape).float())
        start += w.numel()
    return out


def modules_of(model: nn.Module, blocks_per_module: int) -> list[list[tuple[str, nn.Linear]]]:
    """Groups of block linears ranked together: per group of blocks, qkv | proj | fc1+fc2."""
    groups: dict[tuple[int, str], list[tuple[str, nn.Linear]]] = {}
    for name, lin in prunable_linears(model):
        block = int(name.split(".")[1])
        kind = {"qkv": "qkv", "proj": "proj", "fc1": "mlp", "fc2": "mlp"}[name.rsplit(".", 1)[1]]
        groups.setdefault((block // blocks_per_module, kind), []).append((name, lin))
    return list(groups.values())


def apply_dimap(model: nn.Module, cfg: DIMAPConfig | dict | None = None) -> nn.Module:
    """Data-free module-aware unstructured pruning of every block linear (in place); records ``dimap``."""
    cfg = DIMAPConfig(**cfg) if isinstance(cfg, dict) else (cfg or DIMAPConfig())
    if isinstance(cfg.sparsity, bool) or not 0.0 < float(cfg.sparsity) < 1.0:
        raise VitkitError(
            f"DIMAP sparsity: the fraction of weights removed must be in (0, 1), got {cfg.sparsity!r}"
        )
    if int(cfg.blocks_per_module) < 1:
        raise VitkitError(f"DIMAP blocks_per_module must be >= 1, got {cfg.blocks_per_module}")
    if cfg.scores not in ("dimap", "magnitude"):
        raise VitkitError(f"DIMAP scores: expected dimap or magnitude, got '{cfg.scores}'")
    names, scores = [], []
    with torch.no_grad():
        for group in modules_of(model, int(cfg.blocks_per_module)):
            ws = [lin.weight for _, lin in group]
            sc = module_scores(ws) if cfg.scores == "dimap" else [w.detach().abs().float() for w in ws]
            names += [n for n, _ in group]
            scores += sc
        flat = torch.cat([s.flatten() for s in scores])
        k = round(float(cfg.sparsity) * flat.numel())
        # exactly k weights go: the k lowest scores (ties broken by position)
        prune_idx = flat.argsort()[:k]
        keep = torch.ones_like(flat)
        keep[prune_idx] = 0.0
        masked = dict(use_masked_linears(model))
        start = 0
        for name, s in zip(names, scores):
            m = masked[name]
            m.weight_mask.copy_(keep[start : start + s.numel()].reshape(s.shape).to(m.weight_mask))
            start += s.numel()
    record_transform(model, "dimap", cfg.to_dict())
    return model


def replay_dimap(model: nn.Module, config: dict) -> nn.Module:
    use_masked_linears(model)
    record_transform(model, "dimap", dict(config))
    return model


register(
    Technique(
        name="dimap",
        summary="data-free, module-aware unstructured weight masks",
        paper='He & Zhou, "Data-independent Module-aware Pruning for Hierarchical Vision Transformers" (2024)',
        config=DIMAPConfig,
        replay=replay_dimap,
        export=AS_IS,
        family="compress",
        verb="vitkit prune RUN --method dimap",
    )
)
