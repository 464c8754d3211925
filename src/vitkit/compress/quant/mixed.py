"""Mixed-precision bit allocation under an average-bits budget: greedy (after MPTQ-ViT, Tai et al.,
"MPTQ-ViT: Mixed-Precision Post-Training Quantization for Vision Transformer", 2024), relevance-based
(after LRP-QViT, Ranjan & Savakis, "LRP-QViT: Mixed-Precision Vision Transformer Quantization via
Layer-wise Relevance Propagation", 2024) and uniform.

What changes in the model: nothing here; the result is a ``{layer name: bits}`` map that becomes
``QuantConfig.layer_bits`` (weights and input activation of each linear layer), so the allocation is
data in the manifest like any hand-written map.

Our reading / simplifications: MPTQ-ViT's greedy search measures each layer's effect on the model's
loss; here a layer's sensitivity at b bits is the relative output error of that layer alone
(weights per channel and input per tensor, min-max, on captured calibration inputs), which needs one
float pass instead of one model evaluation per candidate. The greedy step lowers, among layers not
yet at the lowest choice, the one with the smallest added error per saved bit·parameter, until the
parameter-weighted average weight bits meet the budget.

LRP-QViT (no public code; our reading of the paper): a layer's contribution score is the total
absolute relevance of its output, propagated back from the predicted class logit and averaged over the
calibration images, normalized to sum 1; more relevant layers get more bits under the budget.
Simplifications: relevance is gradient×activation at each layer's output (the LRP-0 / LRP-ε proxy
with ε→0, which equals LRP-0 for linear layers and ignores LRP's special rules for attention,
softmax and LayerNorm: no AttnLRP/Chefer rules); the allocation is the same greedy as above with the
cost of lowering layer l from b to b' bits modelled as ``score_l · (4^-b' − 4^-b)`` (relevance ×
the increase of uniform quantization noise power) per saved bit·parameter, not the paper's search
(Mix-QViT's integer program is not implemented).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn

from vitkit.compress.quant.points import LINEAR_ROLES, find_points
from vitkit.compress.quant.quantizers import UniformQuantizer, check_bits
from vitkit.errors import VitkitError


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module, images: torch.Tensor, choices: list[int], batch: int = 32
) -> dict[str, dict[int, float]]:
    """{linear layer: {bits: relative output error when only it is quantized at bits}}."""
    layers = {p.name: p.module for p in find_points(model) if p.role in LINEAR_ROLES}
    inputs: dict[str, list[torch.Tensor]] = defaultdict(list)
    handles = [
        m.register_forward_pre_hook(lambda mod, a, n=n: inputs[n].append(a[0].detach()))
        for n, m in layers.items()
    ]
    try:
        for i in range(0, len(images), batch):
            model(images[i : i + batch])
    finally:
        for h in handles:
            h.remove()
    out: dict[str, dict[int, float]] = {}
    for name, m in layers.items():
        x = torch.cat(inputs.pop(name))
        if isinstance(m, nn.Linear):
            x = x.reshape(-1, x.shape[-1])
            x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:2048]]
            ref = nn.functional.linear(x, m.weight, m.bias)
        else:
            ref = m(x)
        out[name] = {}
        for b in choices:
            wq = UniformQuantizer(b, channels=m.weight.shape[0], axis=0).to(x.device).calibrate(m.weight)
            xq = UniformQuantizer(b).to(x.device).calibrate(x)
            if isinstance(m, nn.Linear):
                y = nn.functional.linear(xq(x), wq(m.weight), m.bias)
            else:
                y = m._conv_forward(xq(x), wq(m.weight), m.bias)
            out[name][b] = float((y - ref).pow(2).mean() / ref.pow(2).mean().clamp_min(1e-12))
    return out


def layer_relevance(model: nn.Module, images: torch.Tensor, batch: int = 32) -> dict[str, float]:
    """{linear layer: share of total |relevance|} (gradient×activation of the layer's output w.r.t. the
    predicted class logit, summed over the output, averaged over images, normalized to sum 1)."""
    layers = {p.name: p.module for p in find_points(model) if p.role in LINEAR_ROLES}
    outputs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(mod, args, out):
            out.retain_grad()
            outputs[name] = out

        return hook

    total = dict.fromkeys(layers, 0.0)
    handles = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
    try:
        with torch.enable_grad():
            for i in range(0, len(images), batch):
                x = images[i : i + batch].detach().requires_grad_(True)  # so every activation has a grad
                logits = model(x)
                logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
                for n, y in outputs.items():
                    total[n] += float((y.detach() * y.grad).abs().sum())
                outputs.clear()
                model.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
    norm = sum(total.values()) or 1.0
    return {n: v / norm for n, v in total.items()}


def relevance_sensitivity(relevance: dict[str, float], choices: list[int]) -> dict[str, dict[int, float]]:
    """LRP-QViT's allocation as a sensitivity table: relevance × uniform quantization noise power 4^-b."""
    return {n: {b: r * 4.0**-b for b in choices} for n, r in relevance.items()}


def allocate_bits(
    sensitivity: dict[str, dict[int, float]],
    params: dict[str, int],
    avg_bits: float,
    strategy: str = "greedy",
) -> dict[str, int]:
    """Bits per layer with parameter-weighted average ≤ ``avg_bits``.

    ``greedy``: start every layer at the highest choice, repeatedly lower the layer with the
    smallest error increase per saved bit·parameter. ``reverse``: the same steps, most sensitive
    first (a deliberately bad baseline). ``uniform``: the highest single choice that fits.
    """
    choices = sorted({b for s in sensitivity.values() for b in s})
    for b in choices:
        check_bits(b, "mixed-precision bit choice")
    if not choices or avg_bits < choices[0]:
        raise VitkitError(
            f"avg_bits={avg_bits} is below the lowest bit choice {choices[:1]}: no allocation fits"
        )
    total = sum(params.values())
    bits = {n: choices[-1] for n in sensitivity}

    def average() -> float:
        return sum(bits[n] * params[n] for n in bits) / total

    if strategy == "uniform":
        fit = max(b for b in choices if b <= avg_bits)
        return dict.fromkeys(sensitivity, fit)
    if strategy not in ("greedy", "reverse"):
        raise VitkitError(f"mixed-precision strategy must be greedy, reverse or uniform, got '{strategy}'")
    while average() > avg_bits + 1e-9:
        best, best_cost = None, None
        for n, b in bits.items():
            lower = [c for c in choices if c < b]
            if not lower:
                continue
            nb = lower[-1]
            cost = (sensitivity[n][nb] - sensitivity[n][b]) / ((b - nb) * params[n])
            if strategy == "reverse":
                cost = -cost
            if best_cost is None or cost < best_cost:
                best, best_cost = (n, nb), cost
        if best is None:
            break
        bits[best[0]] = best[1]
    # A large layer's step can overshoot the budget: give the spare bits back, most useful first.
    raised = True
    while raised:
        raised = False
        gains = []
        for n, b in bits.items():
            higher = [c for c in choices if c > b]
            if higher:
                gain = (sensitivity[n][b] - sensitivity[n][higher[0]]) / ((higher[0] - b) * params[n])
                gains.append((-gain if strategy == "greedy" else gain, n, higher[0]))
        for _, n, nb in sorted(gains):
            old = bits[n]
            bits[n] = nb
            if average() <= avg_bits + 1e-9:
                raised = True
                break
            bits[n] = old
    return bits


def mixed_precision_bits(
    model: nn.Module, images: torch.Tensor, avg_bits: float, choices: list[int], strategy: str = "greedy"
) -> dict[str, Any]:
    """The ``layer_bits`` map for ``model`` (exact layer names, usable as fnmatch patterns)."""
    was = model.training
    model.eval()
    try:
        if strategy == "lrp":
            sens = relevance_sensitivity(layer_relevance(model, images), choices)
            strategy = "greedy"
        else:
            sens = layer_sensitivity(model, images, choices)
    finally:
        model.train(was)
    params = {p.name: p.module.weight.numel() for p in find_points(model) if p.role in LINEAR_ROLES}
    return allocate_bits(sens, params, avg_bits, strategy)


def average_bits(layer_bits: dict[str, int], model: nn.Module) -> float:
    params = {p.name: p.module.weight.numel() for p in find_points(model) if p.role in LINEAR_ROLES}
    return sum(layer_bits[n] * params[n] for n in layer_bits) / sum(params[n] for n in layer_bits)


def plot_bits(layer_bits: dict[str, int], path) -> None:
    """A bar chart of the bits per layer (in forward order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vitkit.io import atomic_path

    names = list(layer_bits)
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(names)), 3.5))
    ax.bar(range(len(names)), [layer_bits[n] for n in names])
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_ylabel("bits")
    ax.set_title("mixed-precision bit allocation")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
