"""Position artifacts in ViT features: a diagnostic, a zero-parameter correction, a learned denoiser.

Paper: Yang, Luo, Lu, Guibas, Wang et al., "Denoising Vision Transformers" (ECCV 2024), code
Jiawei-Yang/Denoising-ViT. It decomposes a ViT's features of a view as
``ViT(view)(p) = F(global coords) + G(p) + h(view, p)``: image content in image coordinates, an
input-independent position artifact, and a residual.

What it changes: nothing in the model; it reads last-layer patch tokens (``forward_intermediates``,
prefix and register tokens excluded via ``num_prefix_tokens``) and reports:

* the lightweight diagnostic: the position-locked mean map ``Ĝ(p) = mean_i f_i(p) − mean_{i,p} f``,
  its explained-variance score ``PAS = Σ_p ‖Ĝ(p)‖² / Σ_{i,p} ‖f_i(p) − f̄‖²``, high-norm token count
  (``‖f‖ > μ + 3σ``), a shift test (similarity of two views aligned by token index vs by content) and
  a PCA image of ``Ĝ``;
* the zero-parameter correction ``f − Ĝ``;
* the paper's generalisable denoiser (stage 2): one timm ``Block`` (heads = d/64) with its own
  learnable position embedding, on frozen features, trained with ``MSE + (1 − cos)``.

Simplified (our reading, no tinycudann): stage 1's per-image neural field ``F`` (a hash grid sampled
at continuous view coordinates) is replaced by a discrete per-image lattice in canvas coordinates,
with views that are crops shifted by whole patches; ``F`` and ``G`` are then the least-squares
solution of ``f_{i,v}(p) = F_i(p + o_v) + G(p)`` found by alternating means, and the residual
``h`` is not modelled (it is what the view averaging removes). Stage 2's targets are this ``F``.
Caveat measured in bench/RESULTS.md: on centred datasets (digits, Fashion-MNIST) ``Ĝ`` also holds
the dataset's mean layout, which the shift decomposition does not confuse with an artifact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.analyze.common import PixelModel, pixel_transform, subsample
from vitkit.data import ImageDataset
from vitkit.errors import VitkitError
from vitkit.models import num_prefix_tokens


# -- the diagnostic on a feature tensor -------------------------------------------------------------
def _check_grid(features: torch.Tensor) -> torch.Tensor:
    if features.ndim != 4:
        raise VitkitError(f"position artifacts need features (n, h, w, d), got shape {tuple(features.shape)}")
    if features.shape[0] < 2:
        raise VitkitError("position artifacts need at least 2 images")
    return features.to(torch.float64)


def position_map(features: torch.Tensor) -> torch.Tensor:
    """Ĝ: the position-locked mean, (h, w, d), with the global mean removed."""
    f = _check_grid(features)
    g = f.mean(0)
    return g - g.mean((0, 1), keepdim=True)


def position_artifact_score(features: torch.Tensor, g: torch.Tensor | None = None) -> float:
    """PAS: the fraction of the feature variance explained by position alone."""
    f = _check_grid(features)
    g = position_map(f) if g is None else g.to(torch.float64)
    total = ((f - f.mean((0, 1, 2), keepdim=True)) ** 2).sum() / f.shape[0]
    return float((g**2).sum() / total) if total > 0 else 0.0


def high_norm_tokens(features: torch.Tensor, sigmas: float = 3.0) -> dict[str, Any]:
    """Tokens whose norm exceeds mean + ``sigmas``·std of all token norms (register-like outliers)."""
    f = _check_grid(features)
    norms = f.norm(dim=-1)
    thr = norms.mean() + sigmas * norms.std()
    hi = norms > thr
    return {
        "threshold": float(thr),
        "count": int(hi.sum()),
        "fraction": float(hi.float().mean()),
        "per_position_fraction": hi.float().mean(0).tolist(),
    }


def correct_features(features: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The zero-parameter correction: subtract the position map (broadcast over images)."""
    return features - g.to(features.dtype)


def pca_image(g: torch.Tensor, components: int = 3) -> torch.Tensor:
    """(h, w, d) → (h, w, 3) in [0, 1]: the first principal components as colours."""
    h, w, d = g.shape
    x = g.reshape(h * w, d).to(torch.float64)
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    k = min(components, v.shape[0])
    p = x @ v[:k].T
    if k < components:
        p = torch.cat([p, torch.zeros(h * w, components - k, dtype=p.dtype)], 1)
    p = (p - p.min(0).values) / (p.max(0).values - p.min(0).values).clamp_min(1e-12)
    return p.reshape(h, w, components).float()


# -- features of shifted views ----------------------------------------------------------------------
def patch_features(
    model: nn.Module, x: torch.Tensor, *, layer: int = -1, norm: bool = True, batch_size: int = 32
) -> torch.Tensor:
    """Patch tokens of block ``layer`` for images ``x`` in [0, 1]: (B, gh, gw, d), prefix tokens dropped."""
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "patch_embed"):
        raise VitkitError(
            f"{type(model).__name__}: position artifacts need a timm ViT (forward_intermediates)"
        )
    pm = PixelModel(model).to(x.device)
    gh, gw = (int(s) for s in model.patch_embed.grid_size)
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            (t,) = model.forward_intermediates(
                pm.normalize(x[i : i + batch_size]),
                indices=[layer if layer >= 0 else len(model.blocks) + layer],
                norm=norm,
                output_fmt="NLC",
                intermediates_only=True,
            )
            out.append(t.reshape(t.shape[0], gh, gw, -1).float().cpu())
    return torch.cat(out)


def view_offsets(max_shift: int) -> list[tuple[int, int]]:
    """Every crop offset (in patches) of a canvas padded by ``max_shift`` patches on each side."""
    r = range(2 * max_shift + 1)
    return [(oy, ox) for oy in r for ox in r]


def shifted_views(x: torch.Tensor, patch: tuple[int, int], max_shift: int) -> tuple[torch.Tensor, list]:
    """(B, V, C, H, W) crops of the reflect-padded images, shifted by whole patches; and the offsets."""
    ph, pw = patch
    if max_shift < 1:
        return x[:, None], [(0, 0)]
    h, w = x.shape[-2:]
    py, px = max_shift * ph, max_shift * pw
    if py >= h or px >= w:
        raise VitkitError(f"max_shift {max_shift} patches is too large for a {h}x{w} input")
    canvas = F.pad(x, (px, px, py, py), mode="reflect")
    offs = view_offsets(max_shift)
    views = torch.stack([canvas[..., oy * ph : oy * ph + h, ox * pw : ox * pw + w] for oy, ox in offs], 1)
    return views, offs


def decompose_views(
    feats: torch.Tensor, offsets: list[tuple[int, int]], iters: int = 50
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares split of view features ``f[i, v, p] = F_i(p + o_v) + G(p)`` by alternating means.

    feats: (n, V, gh, gw, d). Returns ``F`` (n, gh + 2s, gw + 2s, d) on the canvas lattice and ``G``
    (gh, gw, d) with zero mean (the split is unique up to that constant).
    """
    n, _, gh, gw, d = feats.shape
    s = max(max(o) for o in offsets)
    f = feats.to(torch.float64)
    counts = torch.zeros(gh + 2 * s, gw + 2 * s, 1, dtype=torch.float64)
    for oy, ox in offsets:
        counts[oy : oy + gh, ox : ox + gw] += 1
    counts = counts.clamp_min(1)
    g = torch.zeros(gh, gw, d, dtype=torch.float64)
    field_ = torch.zeros(n, gh + 2 * s, gw + 2 * s, d, dtype=torch.float64)
    for _ in range(iters):
        field_.zero_()
        for j, (oy, ox) in enumerate(offsets):
            field_[:, oy : oy + gh, ox : ox + gw] += f[:, j] - g
        field_ /= counts
        g = torch.zeros_like(g)
        for j, (oy, ox) in enumerate(offsets):
            g += (f[:, j] - field_[:, oy : oy + gh, ox : ox + gw]).mean(0)
        g /= len(offsets)
        g -= g.mean((0, 1), keepdim=True)
    return field_, g


def sample_field(field_: torch.Tensor, offsets: list[tuple[int, int]], gh: int, gw: int) -> torch.Tensor:
    """The decomposition's clean features of every view: (n, V, gh, gw, d)."""
    return torch.stack([field_[:, oy : oy + gh, ox : ox + gw] for oy, ox in offsets], 1)


def shift_test(feats: torch.Tensor, offsets: list[tuple[int, int]]) -> dict[str, float]:
    """Mean cosine between the centre view and every other view, with tokens aligned by index
    (position-locked) and by image content. Position artifacts make the first win."""
    gh, gw = feats.shape[2:4]
    s = max(max(o) for o in offsets)
    c = offsets.index((s, s)) if (s, s) in offsets else 0
    oc = offsets[c]
    pos, cont = [], []
    for j, o in enumerate(offsets):
        if j == c:
            continue
        pos.append(F.cosine_similarity(feats[:, c], feats[:, j], dim=-1).mean())
        dy, dx = o[0] - oc[0], o[1] - oc[1]
        # centre token p sees canvas p + oc; view j token p - (dy, dx) sees the same canvas cell
        a = feats[:, c, max(dy, 0) : gh + min(dy, 0), max(dx, 0) : gw + min(dx, 0)]
        b = feats[:, j, max(-dy, 0) : gh + min(-dy, 0), max(-dx, 0) : gw + min(-dx, 0)]
        cont.append(F.cosine_similarity(a, b, dim=-1).mean())
    if not pos:
        return {"position_locked": float("nan"), "content_aligned": float("nan"), "gap": float("nan")}
    p, q = float(torch.stack(pos).mean()), float(torch.stack(cont).mean())
    return {"position_locked": p, "content_aligned": q, "gap": p - q}


# -- the learned denoiser (DVT stage 2) -------------------------------------------------------------
class Denoiser(nn.Module):
    """One transformer block with its own position embedding, on frozen patch features (B, gh, gw, d)."""

    def __init__(self, dim: int, grid: tuple[int, int], num_heads: int | None = None):
        super().__init__()
        from timm.layers import trunc_normal_
        from timm.models.vision_transformer import Block

        self.grid = tuple(grid)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim))
        trunc_normal_(self.pos_embed, std=0.02)
        heads = num_heads or max(1, dim // 64)
        if dim % heads:
            heads = 1
        self.block = Block(dim, heads, mlp_ratio=4.0, qkv_bias=True)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        b, gh, gw, d = f.shape
        x = f.reshape(b, gh * gw, d) + self.pos_embed
        return self.block(x).reshape(b, gh, gw, d)


def denoise_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DVT's ``MSE + (1 − cos)``."""
    return F.mse_loss(pred, target) + (1 - F.cosine_similarity(pred, target, dim=-1)).mean()


def train_denoiser(
    raw: torch.Tensor,
    target: torch.Tensor,
    *,
    steps: int = 300,
    lr: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
) -> Denoiser:
    """Fit a :class:`Denoiser` from raw features to denoised targets, both (N, gh, gw, d)."""
    torch.manual_seed(seed)
    den = Denoiser(raw.shape[-1], tuple(raw.shape[1:3]))
    opt = torch.optim.AdamW(den.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    raw, target = raw.float(), target.float()
    for _ in range(steps):
        idx = torch.randint(len(raw), (min(batch_size, len(raw)),), generator=g)
        loss = denoise_loss(den(raw[idx]), target[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return den.eval()


# -- the measurement --------------------------------------------------------------------------------
@dataclass
class ArtifactConfig:
    n: int = 32
    max_shift: int = 1  # views shifted by up to this many patches (0: no views, no decomposition)
    layer: int = -1
    norm: bool = True  # apply the final norm to the features (what a dense head sees)
    holdout: float = 0.25  # fraction of images kept out of Ĝ / the denoiser fit
    denoiser: bool = False
    denoiser_steps: int = 300
    batch_size: int = 32
    seed: int = 0


@dataclass
class ArtifactResult:
    config: dict[str, Any]
    grid: tuple[int, int]
    num_prefix_tokens: int
    pas: float  # position-locked mean (Ĝ) score, fit images
    pas_heldout_corrected: float | None  # PAS of held-out features after subtracting Ĝ
    pas_decomposed: float | None  # ‖G‖² share from the shift decomposition (content can't leak in)
    g_agreement: float | None  # cosine between Ĝ and the decomposition's G
    high_norm: dict[str, Any]
    shift: dict[str, float] | None
    denoiser: dict[str, Any] | None = None
    g_hat: torch.Tensor | None = field(default=None, repr=False)
    g_decomposed: torch.Tensor | None = field(default=None, repr=False)
    mean_norm_map: torch.Tensor | None = field(default=None, repr=False)
    example: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = {
            k: v
            for k, v in asdict(self).items()
            if k not in ("g_hat", "g_decomposed", "mean_norm_map", "example")
        }
        d["high_norm"] = {k: v for k, v in self.high_norm.items() if k != "per_position_fraction"}
        return d


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def measure_artifacts(
    model: nn.Module,
    data: ImageDataset,
    cfg: ArtifactConfig | None = None,
    device: str | torch.device = "cpu",
) -> ArtifactResult:
    """The DVT diagnostic (and, with ``cfg.denoiser``, the learned denoiser) on ``cfg.n`` images."""
    cfg = cfg or ArtifactConfig()
    model = model.to(device).eval()
    if not hasattr(model, "patch_embed"):
        raise VitkitError(f"{type(model).__name__}: position artifacts need a ViT with a patch grid")
    pe = model.patch_embed
    gh, gw = (int(s) for s in pe.grid_size)
    ph, pw = (int(s) for s in pe.patch_size)
    data = subsample(data, cfg.n, cfg.seed)
    if len(data) < 4:
        raise VitkitError(f"position artifacts need at least 4 images, got {len(data)}")
    x = pixel_transform(model)(data.images, data.targets)[0].to(device)
    views, offsets = shifted_views(x, (ph, pw), cfg.max_shift)
    n, v = views.shape[:2]
    feats = patch_features(
        model, views.flatten(0, 1), layer=cfg.layer, norm=cfg.norm, batch_size=cfg.batch_size
    ).reshape(n, v, gh, gw, -1)
    centre = offsets.index((cfg.max_shift, cfg.max_shift))
    n_hold = max(1, round(n * cfg.holdout)) if cfg.holdout > 0 else 0
    fit, hold = slice(0, n - n_hold), slice(n - n_hold, n)
    f_fit = feats[fit].flatten(0, 1)  # every view is one more sample of position-locked statistics
    g_hat = position_map(f_fit)
    res = ArtifactResult(
        config=asdict(cfg),
        grid=(gh, gw),
        num_prefix_tokens=num_prefix_tokens(model),
        pas=position_artifact_score(f_fit, g_hat),
        pas_heldout_corrected=None,
        pas_decomposed=None,
        g_agreement=None,
        high_norm=high_norm_tokens(feats[:, centre]),
        shift=None,
        g_hat=g_hat.float(),
        mean_norm_map=feats[:, centre].norm(dim=-1).mean(0),
    )
    if n_hold >= 2:
        res.pas_heldout_corrected = position_artifact_score(
            correct_features(feats[hold].flatten(0, 1).double(), g_hat)
        )
    res.example = {
        "image": x[0].cpu(),
        "raw": pca_image(feats[0, centre]),
        "corrected": pca_image(feats[0, centre] - g_hat.float()),
    }
    if cfg.max_shift >= 1:
        res.shift = shift_test(feats, offsets)
        field_, g = decompose_views(feats, offsets)
        total = ((feats.double() - feats.double().mean((0, 1, 2, 3))) ** 2).sum() / (n * v)
        res.pas_decomposed = float((g**2).sum() / total)
        res.g_agreement = _cos(g_hat, g)
        res.g_decomposed = g.float()
        if cfg.denoiser:
            if n_hold < 1 or n - n_hold < 1:
                raise VitkitError(
                    "the learned denoiser needs a holdout fraction that leaves images on both sides"
                )
            clean = sample_field(field_, offsets, gh, gw).float()
            den = train_denoiser(
                feats[fit].flatten(0, 1), clean[fit].flatten(0, 1), steps=cfg.denoiser_steps, seed=cfg.seed
            )
            raw_h, tgt_h = feats[hold].flatten(0, 1), clean[hold].flatten(0, 1)
            with torch.no_grad():
                out_h = den(raw_h)
            cos = lambda a: float(F.cosine_similarity(a, tgt_h, dim=-1).mean())  # noqa: E731
            res.denoiser = {
                "heldout_cosine_to_target": {
                    "raw": cos(raw_h),
                    "minus_g_hat": cos(raw_h - g_hat.float()),
                    "minus_g_decomposed": cos(raw_h - g.float()),
                    "denoiser": cos(out_h),
                },
                "heldout_pas": {
                    "raw": position_artifact_score(raw_h),
                    "denoiser": position_artifact_score(out_h),
                    "target": position_artifact_score(tgt_h),
                },
                "parameters": sum(p.numel() for p in den.parameters()),
                "steps": cfg.denoiser_steps,
            }
            res.example["denoised"] = pca_image(out_h[0])
            res.denoiser["module"] = den
    return res


def plot_artifacts(res: ArtifactResult, path) -> None:
    """Ĝ as a PCA image, ‖Ĝ‖ and mean token norm per position, and one image's features before and
    after the correction (PCA colours)."""
    from vitkit.analyze.common import pyplot, save_figure

    plt = pyplot()
    panels: list[tuple[str, Any, str | None]] = [
        ("Ĝ (PCA)", pca_image(res.g_hat).numpy(), None),
        ("‖Ĝ(p)‖", res.g_hat.norm(dim=-1).numpy(), "viridis"),
        ("mean ‖f(p)‖", res.mean_norm_map.numpy(), "viridis"),
    ]
    if res.g_decomposed is not None:
        panels.append(("G from shifts (PCA)", pca_image(res.g_decomposed).numpy(), None))
    img = res.example["image"].permute(1, 2, 0).numpy()
    panels.append(
        ("image", img[..., 0] if img.shape[-1] == 1 else img, "gray" if img.shape[-1] == 1 else None)
    )
    panels.append(("features (PCA)", res.example["raw"].numpy(), None))
    panels.append(("features − Ĝ", res.example["corrected"].numpy(), None))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels), 2.5))
    for ax, (title, arr, cmap) in zip(axes, panels):
        ax.imshow(arr, cmap=cmap)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.suptitle(
        f"PAS {res.pas:.3f}"
        + (f", decomposed {res.pas_decomposed:.3f}" if res.pas_decomposed is not None else ""),
        fontsize=9,
    )
    save_figure(fig, path)
