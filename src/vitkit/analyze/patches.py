"""Patch perturbations on the ViT grid, and the attention-temperature defense.

Paper: Gu, Tresp, Qin, "Are Vision Transformers Robust to Patch Perturbations?" (ECCV 2022). There
is no public code; this is our reading of the paper, flagged where it is one.

What it changes: nothing in the model for the measurements; :func:`attention_temperature` (and the
replayable transform :func:`apply_attention_temperature`) divides every attention logit by T through
the unfused attention module's logit hook, ``softmax(QKᵀ/(√d·T))``.

* Natural patch corruption: an ImageNet-C style corruption (our parametrisation of noise, blur,
  contrast, brightness, pixelate at severities 1–5) applied to the whole image, then pasted into k
  patches aligned with the model's patch grid (``patch_embed.grid_size`` / ``patch_size``); every
  other pixel is unchanged.
* Adversarial patch attack: PGD on the pixels of k grid-aligned patches only (a mask), budget ε = 1
  (unconstrained inside [0, 1]) by default. The patch positions are drawn at random per image from a
  seeded generator, so a ViT and a CNN see the same positions. (Our reading: the paper also studies
  attacking every position; the budget and steps are not in the material we had.)
* Defense: T > 1 at inference. T = 1 attaches nothing, so the model is reproduced bit for bit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.analyze.attacks import AttackConfig, attack_batch, check_eps, robustness_counts
from vitkit.analyze.common import PixelModel, check_classifier, subsample
from vitkit.data import ImageDataset
from vitkit.errors import VitkitError
from vitkit.models import attention_modules, logit_hook, model_input_size, record_transform
from vitkit.registry import AS_IS, Technique, register


# -- the grid ---------------------------------------------------------------------------------------
def patch_grid(model: nn.Module, patch_size: int | None = None) -> tuple[int, int, int, int]:
    """(grid_h, grid_w, patch_h, patch_w) of the model's input. ViTs: from ``patch_embed``; other models
    (a CNN compared with a ViT) need ``patch_size``, e.g. the ViT's."""
    _, h, w = model_input_size(model)
    pe = getattr(model, "patch_embed", None)
    if patch_size is None and pe is not None and getattr(pe, "patch_size", None) is not None:
        ph, pw = pe.patch_size
        gh, gw = pe.grid_size
        return int(gh), int(gw), int(ph), int(pw)
    if patch_size is None:
        raise VitkitError(
            f"{type(model).__name__} has no patch grid: give patch_size (e.g. the ViT's) to perturb it"
        )
    if h % patch_size or w % patch_size:
        raise VitkitError(f"patch_size {patch_size} does not divide the input size {h}x{w}")
    return h // patch_size, w // patch_size, patch_size, patch_size


def random_patch_mask(
    n: int,
    grid: tuple[int, int, int, int],
    k: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(n, 1, H, W) float mask with ``k`` random grid cells per image set to 1."""
    gh, gw, ph, pw = grid
    if not 1 <= k <= gh * gw:
        raise VitkitError(f"patches must be between 1 and the {gh * gw} cells of the {gh}x{gw} grid, got {k}")
    scores = torch.rand(n, gh * gw, generator=generator)
    cells = torch.zeros(n, gh * gw)
    cells.scatter_(1, scores.topk(k, dim=1).indices, 1.0)
    cells = cells.view(n, 1, gh, gw)
    return cells.repeat_interleave(ph, 2).repeat_interleave(pw, 3)


# -- natural corruptions ----------------------------------------------------------------------------
def _gaussian_noise(x, s, g):
    sigma = [0.08, 0.12, 0.18, 0.26, 0.38][s - 1]
    return x + torch.randn(x.shape, generator=g).to(x) * sigma


def _shot_noise(x, s, g):
    lam = [60.0, 25.0, 12.0, 5.0, 3.0][s - 1]
    return torch.poisson(x * lam, generator=g) / lam


def _impulse_noise(x, s, g):
    amount = [0.03, 0.06, 0.09, 0.17, 0.27][s - 1]
    u = torch.rand(x.shape, generator=g).to(x)
    salt = torch.rand(x.shape, generator=g).to(x) < 0.5
    return torch.where(u < amount, salt.to(x.dtype), x)


def _gaussian_blur(x, s, g):
    from torchvision.transforms.functional import gaussian_blur

    # σ in units of the image side (ImageNet-C's 1..6 px at 224 px), at least half a pixel
    sigma = max(0.5, [1, 2, 3, 4, 6][s - 1] * x.shape[-1] / 224)
    k = 2 * math.ceil(3 * sigma) + 1
    return gaussian_blur(x, [k, k], [sigma, sigma])


def _contrast(x, s, g):
    c = [0.4, 0.3, 0.2, 0.1, 0.05][s - 1]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * c + mean


def _brightness(x, s, g):
    return x + [0.1, 0.2, 0.3, 0.4, 0.5][s - 1]


def _pixelate(x, s, g):
    f = [0.6, 0.5, 0.4, 0.3, 0.25][s - 1]
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, int(h * f)), max(1, int(w * f))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


CORRUPTIONS: dict[str, Callable[[torch.Tensor, int, torch.Generator | None], torch.Tensor]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "gaussian_blur": _gaussian_blur,
    "contrast": _contrast,
    "brightness": _brightness,
    "pixelate": _pixelate,
}


def corrupt(
    x: torch.Tensor, name: str, severity: int = 3, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The whole batch corrupted (values clipped to [0, 1])."""
    if name not in CORRUPTIONS:
        raise VitkitError(f"unknown corruption '{name}': expected one of {', '.join(CORRUPTIONS)}")
    if not 1 <= severity <= 5:
        raise VitkitError(f"corruption severity must be 1..5, got {severity}")
    return CORRUPTIONS[name](x, severity, generator).clamp(0, 1)


def corrupt_patches(
    x: torch.Tensor,
    mask: torch.Tensor,
    name: str,
    severity: int = 3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``x`` with the corruption pasted into the masked patches only."""
    return torch.where(mask.bool().expand_as(x), corrupt(x, name, severity, generator), x)


# -- the attention temperature ----------------------------------------------------------------------
def _temperature_fn(t: float):
    inv = 1.0 / float(t)
    return lambda module, logits: logits * inv


@contextlib.contextmanager
def attention_temperature(model: nn.Module, temperature: float) -> Iterator[nn.Module]:
    """Inside the block, every attention layer computes ``softmax(QKᵀ/(√d·T))``. ``T = 1`` attaches
    nothing (the model runs exactly as it is, fused kernel included). Hooks are removed on exit."""
    if temperature <= 0 or not math.isfinite(temperature):
        raise VitkitError(f"attention temperature must be a positive number, got {temperature}")
    if temperature == 1:
        yield model
        return
    with logit_hook(model, _temperature_fn(temperature)):
        yield model


@dataclass
class AttentionTemperatureConfig:
    """``temperature``: every attention logit is divided by it (> 1 flattens attention)."""

    temperature: float = 1.0


def apply_attention_temperature(model: nn.Module, cfg: dict[str, Any] | float) -> nn.Module:
    """The defense as a model transform (kept when the run is saved and loaded): T on every layer."""
    t = float(cfg["temperature"] if isinstance(cfg, dict) else cfg)
    if t <= 0 or not math.isfinite(t):
        raise VitkitError(f"attention temperature must be a positive number, got {t}")
    mods = attention_modules(model)
    if not mods:
        raise VitkitError(
            "attention temperature needs vitkit attention modules (build with vitkit.create_model)"
        )
    if t != 1:
        for m in mods:
            m.register_logit_hook(_temperature_fn(t))
    record_transform(model, "attention_temperature", {"temperature": t})
    return model


replay_attention_temperature = apply_attention_temperature


# -- measurements -----------------------------------------------------------------------------------
@dataclass
class PatchConfig:
    """Patch perturbations. ``patch_size`` is only needed for models without a patch grid (CNNs)."""

    corruptions: tuple[str, ...] = ("gaussian_noise",)
    severity: int = 3
    patches: tuple[int, ...] = (1,)
    temperatures: tuple[float, ...] = (1.0,)
    attack: bool = False  # also run the adversarial patch attack
    eps: float = 1.0  # budget inside the patch (1 = anything in [0, 1])
    alpha: float = 0.1
    steps: int = 20
    patch_size: int | None = None
    n: int | None = 256
    batch_size: int = 64
    seed: int = 0


@dataclass
class PatchResult:
    config: dict[str, Any]
    grid: list[int]
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per (T, kind, k, corruption)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def get(self, **match: Any) -> dict[str, Any]:
        for r in self.rows:
            if all(r.get(k) == v for k, v in match.items()):
                return r
        raise KeyError(match)


@torch.no_grad()
def _accuracy(pm: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], edit=None) -> float:
    correct = total = 0
    for b, (x, y) in enumerate(batches):
        xx = edit(x, b) if edit else x
        correct += int((pm(xx).argmax(1) == y).sum())
        total += len(y)
    return correct / max(total, 1)


def measure_patch_robustness(
    model: nn.Module,
    data: ImageDataset,
    cfg: PatchConfig | None = None,
    device: str | torch.device = "cpu",
) -> PatchResult:
    """Clean accuracy, accuracy with k corrupted patches and robust accuracy under the k-patch attack,
    for every attention temperature in ``cfg.temperatures`` (temperatures other than 1 need a ViT)."""
    from vitkit.analyze.common import pixel_batches

    cfg = cfg or PatchConfig()
    check_classifier(model, data, "patch perturbation")
    check_eps(cfg.eps, "linf", allow_full_box=True)
    model = model.to(device).eval()
    grid = patch_grid(model, cfg.patch_size)
    pm = PixelModel(model).to(device)
    data = subsample(data, cfg.n, cfg.seed)
    batches = list(pixel_batches(model, data, cfg.batch_size, device))
    # One mask (and one noise draw) per (k, batch), shared by every temperature and model.
    masks = {
        k: [
            random_patch_mask(
                len(x), grid, k, torch.Generator().manual_seed(cfg.seed * 1000 + 17 * k + b)
            ).to(device)
            for b, (x, _) in enumerate(batches)
        ]
        for k in cfg.patches
    }
    result = PatchResult(config=asdict(cfg), grid=list(grid))
    for t in cfg.temperatures:
        if t != 1 and not attention_modules(model):
            raise VitkitError(
                f"attention temperature {t} needs a ViT with vitkit attention; this model has none"
            )
        with attention_temperature(model, t):
            clean = _accuracy(pm, batches)
            result.rows.append({"temperature": t, "kind": "clean", "patches": 0, "accuracy": clean})
            for k in cfg.patches:
                for name in cfg.corruptions:

                    def edit(x, b, k=k, name=name):
                        g = torch.Generator().manual_seed(cfg.seed * 7919 + b)
                        return corrupt_patches(x, masks[k][b], name, cfg.severity, g)

                    acc = _accuracy(pm, batches, edit)
                    result.rows.append(
                        {
                            "temperature": t,
                            "kind": "corruption",
                            "corruption": name,
                            "patches": k,
                            "accuracy": acc,
                        }
                    )
                if cfg.attack:
                    acfg = AttackConfig(method="pgd", eps=cfg.eps, alpha=cfg.alpha, steps=cfg.steps, n=None)
                    g = torch.Generator().manual_seed(cfg.seed)

                    def make_adv(x, y, b, ok, k=k, g=g, acfg=acfg):
                        return attack_batch(pm, x, y, acfg, generator=g, mask=masks[k][b][ok])

                    counts = robustness_counts(
                        pm,
                        data,
                        make_adv,
                        batch_size=cfg.batch_size,
                        device=device,
                        description=f"patch attack k={k} T={t}",
                    )
                    result.rows.append(
                        {
                            "temperature": t,
                            "kind": "attack",
                            "patches": k,
                            "accuracy": counts["robust_accuracy"],
                            "attack_success_rate": counts["attack_success_rate"],
                            "clean_accuracy": counts["clean_accuracy"],
                        }
                    )
    return result


def plot_patch_result(result: PatchResult, path, title: str = "") -> None:
    """Accuracy vs attention temperature for clean, corrupted and attacked inputs."""
    from vitkit.analyze.common import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    series: dict[str, list[tuple[float, float]]] = {}
    for r in result.rows:
        key = (
            "clean"
            if r["kind"] == "clean"
            else f"{r.get('corruption', 'attack')} k={r['patches']}"
            if r["kind"] == "corruption"
            else f"patch attack k={r['patches']}"
        )
        series.setdefault(key, []).append((r["temperature"], r["accuracy"]))
    for key, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    ax.set_xlabel("attention temperature T")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or "patch perturbations")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


register(
    Technique(
        name="attention_temperature",
        summary="divide every attention logit by T: the patch-perturbation defence",
        paper='Gu, Tresp, Qin, "Are Vision Transformers Robust to Patch Perturbations?" (2022)',
        config=AttentionTemperatureConfig,
        replay=replay_attention_temperature,
        export=AS_IS,
        family="analyze",
        verb="vitkit perturb RUN --temperature T -o OUT",
    )
)
