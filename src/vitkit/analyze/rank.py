"""Training-free ranking of ViT configurations by As-ViT's network-complexity proxy.

Paper: Chen et al., "Auto-scaling Vision Transformers without Training" (As-ViT, ICLR 2022); code:
VITA-Group/AsViT (``lib/procedures/teg.py``: ``get_curve_complexity``).

What it measures (an analysis; the model is not changed): the *length distortion* of a network at
initialisation. A circle in input space, x(θ) = r (u cos θ + v sin θ) with u, v random orthonormal
directions (r = 1, as the code's SVD columns), is pushed through the network with its LayerNorms
replaced by identities (the code's ``switch_norm('id')``); the proxy is the length of the output
curve of the token-averaged features of the last block, ∮ ||d f(x(θ)) / dθ|| dθ, averaged over ``repeats`` fresh
initialisations and curves. Higher means a more expressive network; As-ViT reports a strong positive
Kendall-τ with accuracy in its search space and uses it, with an NTK trainability score, to search and
scale ViTs.

The trainability score (``lib/procedures/ntk.py``: ``get_ntk_n``, after TE-NAS): the condition
number κ = λ_max / λ_min of the empirical neural tangent kernel Θ = J Jᵀ on one batch of real training
images (16 in As-ViT's search), J's row *i* the gradient of the sum of sample *i*'s logits with respect
to every parameter whose name contains ``weight`` (the code's selection), the network in train mode
with its LayerNorms, averaged over the ``repeats`` initialisations. Lower means easier to train; a
non-finite κ ("bad gradients") is reported as NaN where the code writes -1. ``rank_configs`` reports
its Kendall-τ with accuracy (of -κ, so positive means predictive) and that of the TE-NAS-style rank
sum of both proxies (As-ViT's search combines them through its RL reward; for a fixed grid the rank sum
is our choice).

Our choices: df/dθ by central finite differences in float64 on a copy of the model (the code
back-propagates one output coordinate at a time; SDPA has no forward-mode AD), summed as an arc
length (2π/n Σ, the code's plain sum up to that constant factor, so rankings are the same); the
model's own timm initialisation; ``rank_configs`` builds each (depth, width, heads, patch)
candidate from a vitkit preset with those four overridden and, when asked, trains each briefly
with the one loop to report the Kendall-τ between the proxy and accuracy. Parameter count is
reported as a second, trivial training-free proxy for comparison.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from vitkit.errors import VitkitError
from vitkit.models import count_parameters, create_model, model_input_size
from vitkit.registry import parse_config


class ComplexityConfig(BaseModel):
    """Options of :func:`measure_complexity`."""

    model_config = ConfigDict(extra="forbid")

    points: int = Field(128, ge=8, description="points on the input circle (As-ViT: 500)")
    radius: float = Field(1.0, gt=0, description="radius of the input circle")
    drop_norms: bool = Field(True, description="replace LayerNorms by identities, as As-ViT does")
    step: float = Field(1e-4, gt=0, description="finite-difference step in θ")
    batch: int = Field(64, ge=1)
    seed: int = 0


@dataclass
class ComplexityResult:
    length: float  # arc length of the output curve
    points: int
    features: int  # dimension of the output the length is measured in


def _strip_norms(model: nn.Module) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm):  # timm's LayerNorm subclasses it
                setattr(parent, name, nn.Identity())


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The code's output: the token average of the last block's output (B, C)."""
    out = model.forward_features(x) if hasattr(model, "forward_features") else model(x)
    if out.ndim == 3:
        out = out.mean(1)
    return out.reshape(out.shape[0], -1)


@torch.no_grad()
def measure_complexity(model: nn.Module, cfg: ComplexityConfig | dict | None = None) -> ComplexityResult:
    """As-ViT's length distortion of ``model`` (at its current weights; meant for initialisation).

    Training-free and data-free: the input is a random circle of images. The model is not modified.
    """
    cfg = parse_config(ComplexityConfig, cfg, "complexity")
    net = copy.deepcopy(model).double().eval()
    if cfg.drop_norms:
        _strip_norms(net)
    c, h, w = model_input_size(model)
    dim = c * h * w
    g = torch.Generator().manual_seed(cfg.seed)
    u, _ = torch.linalg.qr(torch.randn(dim, 2, generator=g, dtype=torch.float64))
    theta = torch.arange(cfg.points, dtype=torch.float64) * (2 * math.pi / cfg.points)
    device = next(model.parameters()).device

    def curve(t: torch.Tensor) -> torch.Tensor:
        pts = cfg.radius * (torch.cos(t)[:, None] * u[:, 0] + torch.sin(t)[:, None] * u[:, 1])
        return pts.reshape(-1, c, h, w).to(device)

    speeds, features = [], 0
    for start in range(0, cfg.points, cfg.batch):
        t = theta[start : start + cfg.batch]
        ahead = _features(net, curve(t + cfg.step))
        behind = _features(net, curve(t - cfg.step))
        features = ahead.shape[1]
        speeds.append(((ahead - behind) / (2 * cfg.step)).norm(dim=1).cpu())
    length = torch.cat(speeds).sum().item() * 2 * math.pi / cfg.points
    if not math.isfinite(length):
        raise VitkitError(
            f"complexity: the output curve of {type(model).__name__} is not finite (length {length}); "
            "try a smaller radius or drop_norms=false"
        )
    return ComplexityResult(length, cfg.points, features)


def ntk_condition_number(model: nn.Module, images: torch.Tensor) -> float:
    """As-ViT's NTK condition number of ``model`` on a batch of (normalised) ``images``: per-sample
    gradients of the summed logits w.r.t. the parameters named ``*weight*``, Θ = G Gᵀ, λ_max / λ_min
    (``torch.linalg.eigh``, ascending). Works on a copy in train mode; NaN when Θ is not finite."""
    net = copy.deepcopy(model).train()
    weights = [p for n, p in net.named_parameters() if "weight" in n and p.requires_grad]
    x = images.to(next(net.parameters()).device)
    logits = net(x)
    rows = []
    for i in range(len(x)):
        grads = torch.autograd.grad(logits[i].sum(), weights, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads if g is not None]).detach().cpu())
    g = torch.stack(rows)
    ntk = g @ g.T
    if not torch.isfinite(ntk).all():
        return float("nan")
    eig = torch.linalg.eigvalsh(ntk)
    cond = (eig[-1] / eig[0]).item()
    return cond if math.isfinite(cond) else float("nan")


# -- ranking a grid of configurations ---------------------------------------------------------
@dataclass(frozen=True)
class ArchSpec:
    """One candidate ViT: the four axes As-ViT scales (the rest comes from the base preset)."""

    depth: int
    width: int
    heads: int
    patch: int

    @property
    def name(self) -> str:
        return f"d{self.depth}-w{self.width}-h{self.heads}-p{self.patch}"

    def kwargs(self) -> dict[str, int]:
        return dict(depth=self.depth, embed_dim=self.width, num_heads=self.heads, patch_size=self.patch)


def config_grid(
    depths: list[int], widths: list[int], heads: list[int], patches: list[int], img_size: int
) -> list[ArchSpec]:
    """The product grid; every combination must be buildable (one-line error naming the first that is not)."""
    if not (depths and widths and heads and patches):
        raise VitkitError("rank-configs: depths, widths, heads and patches each need at least one value")
    for name, values in (("depths", depths), ("widths", widths), ("heads", heads), ("patches", patches)):
        if any(v < 1 for v in values):
            raise VitkitError(f"rank-configs: {name} must be positive integers, got {values}")
    for p in patches:
        if img_size % p:
            raise VitkitError(f"rank-configs: patch {p} does not divide the image size {img_size}")
    for wd in widths:
        for hd in heads:
            if wd % hd:
                raise VitkitError(f"rank-configs: width {wd} is not divisible by heads {hd}")
    return [ArchSpec(d, w, h, p) for d in depths for w in widths for h in heads for p in patches]


class RankConfig(BaseModel):
    """Options of :func:`rank_configs`."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field("vitkit_micro_p4_16", description="preset the candidates override")
    img_size: int = Field(16, ge=4)
    num_classes: int = Field(10, ge=1)
    repeats: int = Field(3, ge=1, description="initialisations (and curves) averaged per candidate")
    complexity: ComplexityConfig = Field(default_factory=ComplexityConfig)
    ntk_batch: int = Field(
        16, ge=0, description="images of `data` for the NTK condition number (As-ViT: 16; 0: skip it)"
    )
    train_epochs: int = Field(0, ge=0, description="short training per candidate (0: rank only)")
    train_seeds: int = Field(1, ge=1, description="training seeds averaged per candidate")
    data: str = "digits"
    lr: float = Field(2e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    threads: int | None = Field(None, ge=1)
    seed: int = 0


@dataclass
class RankResult:
    rows: list[dict[str, Any]]  # one per candidate, sorted by the proxy (best first)
    kendall_tau: float | None = None  # proxy vs accuracy
    p_value: float | None = None
    params_kendall_tau: float | None = None  # parameter count vs accuracy (trivial proxy)
    ntk_kendall_tau: float | None = None  # -NTK condition number vs accuracy
    combined_kendall_tau: float | None = None  # -(rank by complexity + rank by NTK) vs accuracy
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_candidate(spec: ArchSpec, cfg: RankConfig, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(cfg.base_model, num_classes=cfg.num_classes, img_size=cfg.img_size, **spec.kwargs())


def kendall_tau(a: list[float], b: list[float]) -> tuple[float, float]:
    from scipy.stats import kendalltau

    res = kendalltau(a, b)
    return float(res.statistic), float(res.pvalue)


def rank_configs(
    specs: list[ArchSpec],
    cfg: RankConfig | dict | None = None,
    *,
    progress: bool = True,
    cache: str | os.PathLike | None = None,
) -> RankResult:
    """Score every candidate with the complexity proxy at init; with ``train_epochs`` > 0 also train
    it briefly on ``data`` and report the Kendall-τ between proxy and validation accuracy.

    ``cache``: a JSON file of the rows done so far, written after each candidate and read back when
    its config is the same, so a long ranking cut short resumes where it stopped (each candidate's
    seeds depend on the config alone, not on the order: a resumed ranking equals an uninterrupted one)."""
    cfg = parse_config(RankConfig, cfg, "rank-configs")
    if not specs:
        raise VitkitError("rank-configs: no configurations to rank")
    from vitkit.progress import track

    data = None
    splits = None
    if cfg.train_epochs or cfg.ntk_batch:
        from vitkit.data import load_splits

        splits = load_splits(cfg.data)
        if splits.multilabel:
            raise VitkitError(f"rank-configs: {cfg.data} is multi-label; ranking needs single-label accuracy")
        if splits.train.num_classes != cfg.num_classes:
            cfg = cfg.model_copy(update={"num_classes": splits.train.num_classes})
        if cfg.train_epochs:
            data = splits
    rows = []
    done = _read_cache(cache, cfg)
    items = track(specs, total=len(specs), description="ranking", min_items=1 if progress else 10**9)
    for spec in items:
        if spec.name in done:
            rows.append(done[spec.name])
            continue
        lengths, conds = [], []
        for r in range(cfg.repeats):
            model = build_candidate(spec, cfg, cfg.seed + r)
            lengths.append(
                measure_complexity(model, cfg.complexity.model_copy(update={"seed": cfg.seed + r})).length
            )
            if cfg.ntk_batch:
                conds.append(ntk_condition_number(model, ntk_images(splits.train, model, cfg)))
        row: dict[str, Any] = {
            "name": spec.name,
            **asdict(spec),
            "parameters": count_parameters(model),
            "complexity": sum(lengths) / len(lengths),
            "complexity_repeats": lengths,
        }
        if conds:
            row["ntk_cond"] = sum(conds) / len(conds)  # NaN when a repeat had bad gradients
            row["ntk_cond_repeats"] = conds
        if data is not None:
            row["val_top1"] = _short_training(spec, cfg, data)
        rows.append(row)
        if cache is not None:
            from vitkit.io import write_json

            done[spec.name] = row
            write_json(cache, {"config": cfg.model_dump(mode="json"), "rows": done})
    rows.sort(key=lambda r: -r["complexity"])
    result = RankResult(rows, config=cfg.model_dump())
    if data is not None and len(rows) >= 3:
        acc = [r["val_top1"] for r in rows]
        result.kendall_tau, result.p_value = kendall_tau([r["complexity"] for r in rows], acc)
        result.params_kendall_tau, _ = kendall_tau([float(r["parameters"]) for r in rows], acc)
        if all("ntk_cond" in r and math.isfinite(r["ntk_cond"]) for r in rows):
            result.ntk_kendall_tau, _ = kendall_tau([-r["ntk_cond"] for r in rows], acc)
            combined = _rank_sum(rows)
            result.combined_kendall_tau, _ = kendall_tau([-c for c in combined], acc)
    return result


def ntk_images(train, model: nn.Module, cfg: RankConfig) -> torch.Tensor:
    """The first ``ntk_batch`` images of a seeded shuffle of ``train``, as ``model`` takes them."""
    from vitkit.models.inference import eval_transform

    g = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randperm(len(train), generator=g)[: cfg.ntk_batch]
    return eval_transform(model).images(train.images[idx])


def _rank_sum(rows: list[dict[str, Any]]) -> list[float]:
    """TE-NAS's combination: rank by complexity (higher better) + rank by NTK κ (lower better)."""
    from scipy.stats import rankdata

    by_complexity = rankdata([-r["complexity"] for r in rows])
    by_ntk = rankdata([r["ntk_cond"] for r in rows])
    return [float(a + b) for a, b in zip(by_complexity, by_ntk)]


def _read_cache(cache: str | os.PathLike | None, cfg: RankConfig) -> dict[str, dict[str, Any]]:
    """The rows of a cache written with the same config (else none)."""
    if cache is None or not Path(cache).is_file():
        return {}
    import json

    try:
        doc = json.loads(Path(cache).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if doc.get("config") != cfg.model_dump(mode="json"):
        return {}
    return dict(doc.get("rows", {}))


def _short_training(spec: ArchSpec, cfg: RankConfig, data) -> float:
    from vitkit.train import TrainConfig, fit

    accs = []
    for s in range(cfg.train_seeds):
        seed = cfg.seed + 1000 + s
        model = build_candidate(spec, cfg, seed)
        tcfg = TrainConfig(
            model=cfg.base_model,
            epochs=cfg.train_epochs,
            lr=cfg.lr,
            batch_size=cfg.batch_size,
            warmup_epochs=min(1, cfg.train_epochs - 1) if cfg.train_epochs > 1 else 0,
            seed=seed,
            threads=cfg.threads,
            tensorboard=False,
        )
        accs.append(float(fit(model, data, tcfg, quiet=True).val_metrics["val_top1"]))
    return sum(accs) / len(accs)


def plot_ranking(result: RankResult, path) -> None:
    """Scatter of the proxy against accuracy, one point per candidate (size: parameters), τ in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vitkit.io import atomic_path

    rows = [r for r in result.rows if "val_top1" in r]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    sizes = [20 + 180 * r["parameters"] / max(x["parameters"] for x in rows) for r in rows]
    sc = ax.scatter(
        [r["complexity"] for r in rows],
        [r["val_top1"] for r in rows],
        s=sizes,
        c=[r["depth"] for r in rows],
        cmap="viridis",
        alpha=0.8,
    )
    xs = [r["complexity"] for r in rows]
    log = min(xs) > 0 and max(xs) / min(xs) > 10
    if log:
        ax.set_xscale("log")
    ax.set_xlabel("As-ViT complexity at init (output curve length" + (", log)" if log else ")"))
    ax.set_ylabel("val top-1 after short training")
    tau = "n/a" if result.kendall_tau is None else f"{result.kendall_tau:.2f}"
    ptau = "n/a" if result.params_kendall_tau is None else f"{result.params_kendall_tau:.2f}"
    ax.set_title(f"Kendall-τ proxy {tau}, parameters {ptau} ({len(rows)} configs)")
    fig.colorbar(sc, ax=ax, label="depth")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
