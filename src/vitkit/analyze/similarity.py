"""Representation similarity between two models (or two input sets), layer by layer: CKA and RSA.

Papers: Kornblith, Norouzi, Lee, Hinton, "Similarity of Neural Network Representations Revisited"
(ICML 2019) — linear / RBF CKA, formulas as in their reference code; the debiased estimator of
Székely & Rizzo (2014) as used there; Nguyen, Raghu, Kornblith, "Do Wide and Deep Networks Learn the
Same Things?" (ICLR 2021) — minibatch CKA; Kriegeskorte et al. 2008 — RSA. The metric set is the one
of Shah & Tripathi, "Purrturbed but Stable: Human-Cat Invariant Representations Across CNNs, ViTs and
Self-Supervised ViTs" (arXiv 2511.02404, 2025), which has no public code.

What it changes: nothing; features come from timm's ``forward_intermediates`` (no hooks at all, so
nothing can be left attached), under ``torch.no_grad``, and every metric runs in float64.

Token features (B, N, C) become one row per image by ``pool``:
``mean`` — mean over patch tokens (the default; prefix tokens excluded), ``cls`` — the first prefix
token, ``flatten`` — all patch tokens concatenated (N·C features; the most faithful to the spatial
code, and memory-heavy). CNN maps (B, C, H, W) are treated as H·W tokens.
Minibatch CKA is a different, batch-averaged estimator (unbiased HSIC summed over minibatches), not
the full-data CKA: it is labelled as such.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from vitkit.analyze.common import pixel_transform, subsample
from vitkit.data import ImageDataset
from vitkit.errors import VitkitError
from vitkit.models import model_input_size

METRICS = ("cka-linear", "cka-rbf", "cka-debiased", "cka-minibatch", "rsa")
POOLS = ("mean", "cls", "flatten")


# -- Gram matrices and centring ---------------------------------------------------------------------
def _f64(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.as_tensor(x).to(torch.float64).flatten(1)


def gram_linear(x: torch.Tensor) -> torch.Tensor:
    x = _f64(x)
    return x @ x.T


def gram_rbf(x: torch.Tensor, threshold: float = 1.0) -> torch.Tensor:
    """``exp(-‖xi-xj‖² / (2·θ²·median(D²)))``; the median includes the zero diagonal, as the reference
    code does."""
    x = _f64(x)
    g = x @ x.T
    n = torch.diag(g)
    d2 = (n[:, None] + n[None, :] - 2 * g).clamp_min(0)
    # numpy's median (the reference) averages the two middle values; torch.median takes the lower one
    med = float(np.median(d2.cpu().numpy()))
    if med <= 0:
        raise VitkitError("RBF CKA: all feature vectors are identical (median distance 0)")
    return torch.exp(-d2 / (2 * threshold**2 * med))


def center_gram(k: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """``HKH`` (biased) or the U-statistic centring of the unbiased HSIC (diagonal zeroed before and
    after)."""
    k = k.clone()
    n = k.shape[0]
    if unbiased:
        if n < 4:
            raise VitkitError(f"debiased CKA needs at least 4 samples, got {n}")
        k.fill_diagonal_(0)
        means = k.sum(0) / (n - 2)
        means = means - means.sum() / (2 * (n - 1))
        k = k - means[:, None] - means[None, :]
        k.fill_diagonal_(0)
    else:
        means = k.mean(0)
        means = means - means.mean() / 2
        k = k - means[:, None] - means[None, :]
    return k


def cka(k: torch.Tensor, l: torch.Tensor, debiased: bool = False) -> float:  # noqa: E741
    """CKA of two Gram matrices: ⟨K̃, L̃⟩ / (‖K̃‖·‖L̃‖)."""
    if k.shape != l.shape:
        raise VitkitError(f"CKA: Gram matrices of different sizes {tuple(k.shape)} vs {tuple(l.shape)}")
    kc = center_gram(k.to(torch.float64), debiased)
    lc = center_gram(l.to(torch.float64), debiased)
    num = (kc * lc).sum()
    den = kc.norm() * lc.norm()
    return float(num / den) if den > 0 else float("nan")


def _check_pair(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _f64(x), _f64(y)
    if x.shape[0] != y.shape[0]:
        raise VitkitError(f"similarity: {x.shape[0]} vs {y.shape[0]} samples; rows must be the same stimuli")
    if x.shape[0] < 2:
        raise VitkitError("similarity needs at least 2 samples")
    return x, y


def linear_cka(x, y, debiased: bool = False) -> float:
    x, y = _check_pair(x, y)
    if not debiased and x.shape[1] * y.shape[1] <= x.shape[0] ** 2:
        # feature-space form (cheaper when features ≪ samples): ‖YᵀX‖² / (‖XᵀX‖·‖YᵀY‖), centred columns
        x = x - x.mean(0)
        y = y - y.mean(0)
        num = (y.T @ x).norm() ** 2
        den = (x.T @ x).norm() * (y.T @ y).norm()
        return float(num / den) if den > 0 else float("nan")
    return cka(gram_linear(x), gram_linear(y), debiased)


def rbf_cka(x, y, threshold: float = 1.0, debiased: bool = False) -> float:
    x, y = _check_pair(x, y)
    return cka(gram_rbf(x, threshold), gram_rbf(y, threshold), debiased)


def _hsic1(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741
    """Unbiased HSIC (Song et al. 2012), diagonals zeroed."""
    n = k.shape[0]
    k = k.clone().fill_diagonal_(0)
    l = l.clone().fill_diagonal_(0)  # noqa: E741
    ones = torch.ones(n, 1, dtype=k.dtype)
    trace = (k * l).sum()
    middle = (ones.T @ k @ ones) * (ones.T @ l @ ones) / ((n - 1) * (n - 2))
    last = 2 / (n - 2) * (ones.T @ k @ l @ ones)
    return (trace + middle - last).squeeze() / (n * (n - 3))


def minibatch_cka(x, y, batch_size: int = 64, seed: int = 0) -> float:
    """Nguyen et al.'s minibatch CKA: Σ_b HSIC₁(K_b, L_b) / √(Σ_b HSIC₁(K_b, K_b) · Σ_b HSIC₁(L_b, L_b)),
    linear kernels, over a random partition in batches (a batch-averaged estimator, memory O(batch²))."""
    x, y = _check_pair(x, y)
    if batch_size < 4:
        raise VitkitError(f"minibatch CKA needs batches of at least 4 samples, got {batch_size}")
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    xy = xx = yy = torch.zeros((), dtype=torch.float64)
    for i in range(0, len(perm), batch_size):
        idx = perm[i : i + batch_size]
        if len(idx) < 4:
            continue
        k, l = gram_linear(x[idx]), gram_linear(y[idx])  # noqa: E741
        xy = xy + _hsic1(k, l)
        xx = xx + _hsic1(k, k)
        yy = yy + _hsic1(l, l)
    den = torch.sqrt(xx * yy)
    return float(xy / den) if den > 0 else float("nan")


# -- RSA --------------------------------------------------------------------------------------------
def rdm(x, metric: str = "correlation") -> torch.Tensor:
    """Representational dissimilarity matrix: ``1 − Pearson(x_i, x_j)`` across features (default),
    ``cosine`` or ``euclidean``."""
    x = _f64(x)
    if metric == "correlation":
        z = x - x.mean(1, keepdim=True)
        z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-300)
        return 1 - z @ z.T
    if metric == "cosine":
        z = x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)
        return 1 - z @ z.T
    if metric == "euclidean":
        return torch.cdist(x, x)
    raise VitkitError(f"RDM metric must be correlation, cosine or euclidean, got '{metric}'")


def rsa(x, y, metric: str = "correlation", method: str = "spearman") -> float:
    """RSA: rank (Spearman) or Pearson correlation of the upper-triangular RDM entries (k = 1)."""
    from scipy.stats import rankdata

    x, y = _check_pair(x, y)
    if x.shape[0] < 3:
        raise VitkitError("RSA needs at least 3 samples (an RDM with more than one pair)")
    iu = torch.triu_indices(x.shape[0], x.shape[0], offset=1)
    a = rdm(x, metric)[iu[0], iu[1]].numpy()
    b = rdm(y, metric)[iu[0], iu[1]].numpy()
    if method == "spearman":
        a, b = rankdata(a), rankdata(b)
    elif method != "pearson":
        raise VitkitError(f"RSA method must be spearman or pearson, got '{method}'")
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def similarity(x, y, metric: str, **kw: Any) -> float:
    """One metric of :data:`METRICS` between two (n, p) feature matrices."""
    if metric == "cka-linear":
        return linear_cka(x, y)
    if metric == "cka-rbf":
        return rbf_cka(x, y, threshold=kw.get("rbf_threshold", 1.0))
    if metric == "cka-debiased":
        return linear_cka(x, y, debiased=True)
    if metric == "cka-minibatch":
        return minibatch_cka(x, y, batch_size=kw.get("minibatch_size", 64), seed=kw.get("seed", 0))
    if metric == "rsa":
        return rsa(x, y)
    raise VitkitError(f"unknown similarity metric '{metric}': expected one of {', '.join(METRICS)}")


# -- features ---------------------------------------------------------------------------------------
def _pool(feat: torch.Tensor, prefix: torch.Tensor | None, pool: str) -> torch.Tensor:
    # feat: (B, N, C) patch tokens
    if pool == "mean":
        return feat.mean(1)
    if pool == "flatten":
        return feat.flatten(1)
    if pool == "cls":
        if prefix is None or prefix.shape[1] == 0:
            raise VitkitError("pool='cls' needs a model with a class token; use pool='mean'")
        return prefix[:, 0]
    raise VitkitError(f"pool must be one of {', '.join(POOLS)}, got '{pool}'")


@torch.no_grad()
def layer_features(
    model: nn.Module,
    data: ImageDataset,
    *,
    pool: str = "mean",
    layers: list[int] | None = None,
    batch_size: int = 64,
    img_size: int | None = None,
    device: str | torch.device = "cpu",
) -> list[torch.Tensor]:
    """One (n, p) float32 matrix per block of ``model``, from ``forward_intermediates`` (images in
    [0, 1] at ``img_size`` or the model's size, normalized with the model's mean/std)."""
    from vitkit.analyze.common import PixelModel

    if not hasattr(model, "forward_intermediates"):
        raise VitkitError(
            f"{type(model).__name__} has no forward_intermediates: not a timm model with feature taps"
        )
    model = model.to(device).eval()
    pm = PixelModel(model).to(device)
    tf = pixel_transform(model, img_size)
    is_vit = hasattr(model, "blocks") and hasattr(model, "patch_embed")
    out: list[list[torch.Tensor]] | None = None
    for i in range(0, len(data), batch_size):
        x = pm.normalize(tf.images(data.images[i : i + batch_size]).to(device))
        if is_vit:
            res = model.forward_intermediates(
                x, indices=layers, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
            )
            pairs = [(r[0], r[1]) if isinstance(r, tuple) else (r, None) for r in res]
        else:
            res = model.forward_intermediates(x, indices=layers, intermediates_only=True)
            pairs = [(r.flatten(2).transpose(1, 2), None) for r in res]
        feats = [_pool(f, p, pool).float().cpu() for f, p in pairs]
        if out is None:
            out = [[] for _ in feats]
        for acc, f in zip(out, feats):
            acc.append(f)
    if out is None:
        raise VitkitError(f"'{data.name}' has no images")
    return [torch.cat(chunks) for chunks in out]


@dataclass
class SimilarityConfig:
    metrics: tuple[str, ...] = ("cka-linear",)
    pool: str = "mean"
    n: int | None = 256
    batch_size: int = 64
    rbf_threshold: float = 1.0
    minibatch_size: int = 64
    resize: bool = True  # models with different input sizes: feed each its own size (True) or refuse
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [m for m in self.metrics if m not in METRICS]
        if bad:
            raise VitkitError(f"unknown similarity metric '{bad[0]}': expected one of {', '.join(METRICS)}")
        if self.pool not in POOLS:
            raise VitkitError(f"pool must be one of {', '.join(POOLS)}, got '{self.pool}'")


@dataclass
class SimilarityResult:
    """``matrices[metric][i][j]`` = similarity of layer i of model A and layer j of model B."""

    metrics: dict[str, list[list[float]]]
    layers_a: int
    layers_b: int
    n: int
    config: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        d = asdict(self)
        d["diagonal"] = {m: diagonal(v) for m, v in self.metrics.items()}
        d["diagonal_dominance"] = {m: diagonal_dominance(v) for m, v in self.metrics.items()}
        return d


def diagonal(mat: list[list[float]]) -> list[float]:
    """Entries (i, j(i)) of the aligned diagonal (layers matched by relative depth when counts differ)."""
    la, lb = len(mat), len(mat[0])
    return [mat[i][round(i * (lb - 1) / max(la - 1, 1))] for i in range(la)]


def diagonal_dominance(mat: list[list[float]]) -> float:
    """Fraction of rows whose largest entry is on the (aligned) diagonal, within one layer."""
    la, lb = len(mat), len(mat[0])
    hits = 0
    for i, row in enumerate(mat):
        j = round(i * (lb - 1) / max(la - 1, 1))
        hits += abs(int(np.nanargmax(row)) - j) <= 1
    return hits / la


def measure_similarity(
    model_a: nn.Module,
    model_b: nn.Module,
    data: ImageDataset,
    cfg: SimilarityConfig | None = None,
    data_b: ImageDataset | None = None,
    device: str | torch.device = "cpu",
) -> SimilarityResult:
    """Layer × layer similarity of ``model_a`` and ``model_b`` on the same images (or on ``data`` for A
    and ``data_b`` for B: two input sets of paired stimuli, e.g. clean vs perturbed)."""
    cfg = cfg or SimilarityConfig()
    notes: list[str] = []
    data_a = subsample(data, cfg.n, cfg.seed)
    if data_b is None:
        data_b = data_a
    else:
        if len(data_b) != len(data):
            raise VitkitError(
                f"two input sets must pair the same stimuli: {len(data)} images in A, {len(data_b)} in B"
            )
        data_b = subsample(data_b, cfg.n, cfg.seed)
    if "cka-debiased" in cfg.metrics and len(data_a) < 4:
        raise VitkitError(f"debiased CKA needs at least 4 samples, got {len(data_a)}")
    sa, sb = model_input_size(model_a)[1:], model_input_size(model_b)[1:]
    if sa != sb:
        if not cfg.resize:
            raise VitkitError(
                f"the models take different input sizes ({sa[0]}x{sa[1]} vs {sb[0]}x{sb[1]}); "
                "allow resizing (each model gets the images at its own size) or compare models of one size"
            )
        notes.append(
            f"input sizes differ ({sa[0]}x{sa[1]} vs {sb[0]}x{sb[1]}): each model got the images resized to its own size"
        )
    fa = layer_features(model_a, data_a, pool=cfg.pool, batch_size=cfg.batch_size, device=device)
    fb = (
        fa
        if (model_b is model_a and data_b is data_a)
        else layer_features(model_b, data_b, pool=cfg.pool, batch_size=cfg.batch_size, device=device)
    )
    from vitkit.progress import track

    mats: dict[str, list[list[float]]] = {}
    for metric in cfg.metrics:
        mat = []
        for x in track(fa, total=len(fa), description=metric, min_items=2):
            row = [
                similarity(
                    x,
                    y,
                    metric,
                    rbf_threshold=cfg.rbf_threshold,
                    minibatch_size=cfg.minibatch_size,
                    seed=cfg.seed,
                )
                for y in fb
            ]
            mat.append(row)
        mats[metric] = mat
    from dataclasses import asdict

    return SimilarityResult(mats, len(fa), len(fb), len(data_a), asdict(cfg), notes)


def plot_similarity(result: SimilarityResult, path, names: tuple[str, str] = ("A", "B")) -> None:
    """One layer × layer heatmap per metric, side by side."""
    from vitkit.analyze.common import pyplot, save_figure

    plt = pyplot()
    ms = list(result.metrics)
    fig, axes = plt.subplots(1, len(ms), figsize=(4.2 * len(ms), 3.8), squeeze=False)
    for ax, m in zip(axes[0], ms):
        mat = np.array(result.metrics[m], dtype=float)
        im = ax.imshow(mat, origin="lower", cmap="magma", vmin=min(0.0, np.nanmin(mat)), vmax=1.0)
        ax.set_title(m)
        ax.set_xlabel(f"layer of {names[1]}")
        ax.set_ylabel(f"layer of {names[0]}")
        fig.colorbar(im, ax=ax, fraction=0.046)
    save_figure(fig, path)
