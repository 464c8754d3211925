"""Downstream transfer attack: fool fine-tuned models using only the pre-trained ViT they came from.

Paper: Zheng, Ma, Huang, Yin, Zhang, Wu, Jiang, "Downstream Transfer Attack: Adversarial Attacks on
Downstream Models with Pre-trained Vision Transformers" (arXiv 2408.01705, 2024). No public code was
found: **this module is our reading of the abstract**, flagged as such in the docs.

What it changes: nothing in any model. It crafts L∞ perturbations on the *pre-trained* model by
minimising the cosine similarity of clean vs adversarial features at one block ``l``
(``max_δ −cos(φ_l(x+δ), φ_l(x))``, ``‖δ‖∞ ≤ ε``, PGD with random start), then measures the attack
success rate (on each downstream model's initially correct samples) on models fine-tuned from it.

Our reading of the layer search ("identify the most vulnerable and transferable layer, guided by the
cosine loss"): for every candidate block, run a short PGD on a small search batch (images not in the
evaluation set) and score the block by how far it moves the *final* features, ``1 − cos(φ_L(x'),
φ_L(x))`` (``search_score="final"``, the default), or by how far it moves the attacked block's
own features, ``1 − cos(φ_l(x'), φ_l(x))`` (``"block"``: the literal "most vulnerable layer" reading);
the block with the largest score is used. The "final" score favours late blocks by construction (the
last block's attack optimises exactly that quantity), so on a deep model check the choice against
``per_block=True``, which attacks every candidate block on the evaluation images and reports each
one's transfer ASR (the direct test of whether an earlier block would transfer better). ``φ_l`` is
the mean of block l's patch tokens (``pool="mean"``; ``"flatten"`` uses every token, prefix tokens
included). Baselines in the same run: the last block (a plain feature attack) and uniform noise of
the same budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.analyze.attacks import check_eps, pgd
from vitkit.analyze.common import PixelModel, check_classifier, pixel_transform, subsample
from vitkit.data import ImageDataset
from vitkit.errors import VitkitError
from vitkit.models import model_input_size
from vitkit.progress import track


@dataclass
class DTAConfig:
    eps: float = 8 / 255
    alpha: float = 1 / 255
    steps: int = 10
    layers: tuple[int, ...] | None = None  # candidate blocks (default: all); negative from the end
    layer: int | None = None  # skip the search and attack this block
    search_n: int = 32
    search_steps: int = 5
    search_score: str = "final"  # "final": cosine drop at the last block; "block": at the attacked block
    per_block: bool = False  # also attack every candidate block and report each one's ASR
    pool: str = "mean"
    n: int | None = 256
    batch_size: int = 64
    seed: int = 0


def block_features(model: nn.Module, x: torch.Tensor, layer: int, pool: str = "mean") -> torch.Tensor:
    """φ_l for normalized inputs: (B, p) from ``forward_intermediates`` (stops after block ``layer``)."""
    (t,) = model.forward_intermediates(
        x,
        indices=[layer],
        output_fmt="NLC",
        intermediates_only=True,
        stop_early=True,
        return_prefix_tokens=True,
    )
    patches, prefix = t if isinstance(t, tuple) else (t, None)
    if pool == "mean":
        return patches.mean(1)
    if pool == "flatten":
        return torch.cat([prefix, patches], 1).flatten(1) if prefix is not None else patches.flatten(1)
    raise VitkitError(f"DTA pool must be mean or flatten, got '{pool}'")


def cosine_attack(
    pm: PixelModel, x: torch.Tensor, layer: int, cfg: DTAConfig, steps: int | None = None, generator=None
) -> torch.Tensor:
    """PGD maximising ``−cos(φ_l(x'), φ_l(x))`` on the pre-trained model (``pm`` takes pixels)."""
    with torch.no_grad():
        ref = block_features(pm.model, pm.normalize(x), layer, cfg.pool)

    def loss(xa: torch.Tensor) -> torch.Tensor:
        return -F.cosine_similarity(block_features(pm.model, pm.normalize(xa), layer, cfg.pool), ref, dim=1)

    return pgd(
        loss,
        x,
        eps=cfg.eps,
        alpha=cfg.alpha,
        steps=steps or cfg.steps,
        norm="linf",
        random_start=True,
        generator=generator,
    )


def _depth(model: nn.Module) -> int:
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "forward_intermediates"):
        raise VitkitError(
            f"{type(model).__name__}: the downstream transfer attack needs a timm ViT as the pre-trained model"
        )
    return len(blocks)


def layer_search(pm: PixelModel, x: torch.Tensor, layers: Sequence[int], cfg: DTAConfig) -> dict[int, float]:
    """Score of every candidate block: the cosine drop after a short attack at that block, measured at
    the last block (``cfg.search_score="final"``) or at the attacked block itself (``"block"``)."""
    if cfg.search_score not in ("final", "block"):
        raise VitkitError(f"DTA search_score must be final or block, got '{cfg.search_score}'")
    last = _depth(pm.model) - 1
    scores = {}
    for li in track(layers, total=len(layers), description="DTA layer search", min_items=2):
        at = last if cfg.search_score == "final" else li
        xa = cosine_attack(
            pm, x, li, cfg, steps=cfg.search_steps, generator=torch.Generator().manual_seed(cfg.seed)
        )
        with torch.no_grad():
            ref = block_features(pm.model, pm.normalize(x), at, cfg.pool)
            fa = block_features(pm.model, pm.normalize(xa), at, cfg.pool)
        scores[li] = float((1 - F.cosine_similarity(fa, ref, dim=1)).mean())
    return scores


@dataclass
class DTAResult:
    config: dict[str, Any]
    layer: int
    layer_scores: dict[int, float]
    downstream: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> ASR per attack

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layer_scores"] = {str(k): v for k, v in self.layer_scores.items()}
        return d


@torch.no_grad()
def _asr(model: nn.Module, x: torch.Tensor, xa: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    pm = PixelModel(model).to(x.device)
    ok = pm(x).argmax(1) == y
    fooled = (pm(xa).argmax(1) != y) & ok
    n_ok = int(ok.sum())
    return {
        "clean_accuracy": float(ok.float().mean()),
        "attack_success_rate": float(fooled.sum()) / n_ok if n_ok else float("nan"),
        "robust_accuracy": float((pm(xa).argmax(1) == y).float().mean()),
        "n_initially_correct": n_ok,
    }


def split_search(data: ImageDataset, cfg: DTAConfig) -> tuple[ImageDataset, ImageDataset]:
    """(search images, evaluated images): disjoint, fixed by ``cfg.seed``."""
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed + 1))
    n_search = min(cfg.search_n, max(1, len(data) // 4))
    return data.subset(perm[:n_search]), subsample(data.subset(perm[n_search:]), cfg.n, cfg.seed)


def measure_dta(
    pretrained: nn.Module,
    downstream: dict[str, nn.Module],
    data: ImageDataset,
    cfg: DTAConfig | None = None,
    device: str | torch.device = "cpu",
) -> DTAResult:
    """Craft DTA examples on ``pretrained`` for ``data`` and measure their success on every downstream
    model, next to the last-block and uniform-noise baselines of the same budget."""
    cfg = cfg or DTAConfig()
    if not downstream:
        raise VitkitError("the downstream transfer attack needs at least one downstream (fine-tuned) model")
    check_eps(cfg.eps, "linf")
    if cfg.search_score not in ("final", "block"):
        raise VitkitError(f"DTA search_score must be final or block, got '{cfg.search_score}'")
    pretrained = pretrained.to(device).eval()
    depth = _depth(pretrained)
    size = model_input_size(pretrained)
    for name, m in downstream.items():
        check_classifier(m, data, f"downstream model {name}")
        if model_input_size(m) != size:
            raise VitkitError(
                f"downstream model {name} takes {model_input_size(m)} inputs but the pre-trained model takes {size}: "
                "the attack is crafted at the pre-trained model's input size"
            )
        m.to(device).eval()
    pm = PixelModel(pretrained).to(device)
    tf = pixel_transform(pretrained)
    search, rest = split_search(data, cfg)
    if cfg.layer is not None:
        layer = cfg.layer if cfg.layer >= 0 else depth + cfg.layer
        if not 0 <= layer < depth:
            raise VitkitError(f"DTA layer {cfg.layer} does not exist: the model has {depth} blocks")
        scores: dict[int, float] = {}
    else:
        cands = [li if li >= 0 else depth + li for li in (cfg.layers or range(depth))]
        bad = [li for li in cands if not 0 <= li < depth]
        if bad:
            raise VitkitError(f"DTA candidate layer {bad[0]} does not exist: the model has {depth} blocks")
        xs = tf(search.images, search.targets)[0].to(device)
        scores = layer_search(pm, xs, cands, cfg)
        layer = max(scores, key=scores.get)
    result = DTAResult(config=asdict(cfg), layer=layer, layer_scores=scores)
    attacks = {"dta": layer, "last_layer": depth - 1}
    if cfg.per_block:
        # every candidate block (all of them when the search was skipped): block_<i> entries
        blocks = scores or range(depth)
        attacks.update({f"block_{li}": li for li in blocks})
    g = torch.Generator().manual_seed(cfg.seed)
    xs_all, adv = [], {k: [] for k in [*attacks, "uniform_noise"]}
    ys = []
    for i in track(
        range(0, len(rest), cfg.batch_size),
        total=-(-len(rest) // cfg.batch_size),
        description="DTA",
        min_items=2,
    ):
        xb = tf(rest.images[i : i + cfg.batch_size], rest.targets[i : i + cfg.batch_size])[0].to(device)
        xs_all.append(xb)
        ys.append(rest.targets[i : i + cfg.batch_size].to(device))
        done: dict[int, torch.Tensor] = {}
        for k, li in attacks.items():
            # the same random start for every attack: when the search picks the last block, "dta"
            # and "last_layer" are the same attack and must give the same numbers (computed once)
            if li not in done:
                start = torch.Generator().manual_seed(cfg.seed * 100_003 + i)
                done[li] = cosine_attack(pm, xb, li, cfg, generator=start)
            adv[k].append(done[li])
        noise = (torch.rand(xb.shape, generator=g) * 2 - 1).to(xb) * cfg.eps
        adv["uniform_noise"].append((xb + noise).clamp(0, 1))
    x = torch.cat(xs_all)
    y = torch.cat(ys)
    for name, m in downstream.items():
        result.downstream[name] = {k: _asr(m, x, torch.cat(v), y) for k, v in adv.items()}
    return result
