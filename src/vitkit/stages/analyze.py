"""The analyses as the CLI runs them: resolve the model and data, measure, write JSON + plots.

Each ``run_x`` returns ``(result, output_directory)``. Outputs go to ``RUN/<analysis>/`` by default and
are built in a hidden sibling directory that is swapped into place only when complete.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from vitkit.analyze.artifacts import ArtifactConfig, measure_artifacts, plot_artifacts
from vitkit.analyze.attacks import AttackConfig, measure_attack
from vitkit.analyze.attention import AttentionConfig, attention_json, measure_attention, plot_attention
from vitkit.analyze.common import model_label, output_dir, pyplot, resolve_model, save_figure
from vitkit.analyze.dta import DTAConfig, measure_dta
from vitkit.analyze.mil import MILConfig, measure_mil, read_bags_csv
from vitkit.analyze.patches import PatchConfig, measure_patch_robustness, plot_patch_result
from vitkit.analyze.similarity import SimilarityConfig, measure_similarity, plot_similarity
from vitkit.analyze.tokens import (
    TokenReductionConfig,
    has_token_reduction,
    measure_token_reduction,
    plot_token_reduction,
    token_reduction_json,
)
from vitkit.data import ImageDataset, load_eval_data
from vitkit.errors import VitkitError
from vitkit.io import write_json
from vitkit.models import model_input_size
from vitkit.stages.common import evaluation_data


def analysis_data(model: nn.Module, uri: str | None) -> ImageDataset:
    """The run's own validation split (or ``uri``); models that are not runs need ``uri``."""
    info = getattr(model, "vitkit_run", None)
    img = model_input_size(model)[1]
    if info is not None:
        return evaluation_data(info, uri, img)
    if uri is None:
        raise VitkitError(
            "this model is not a run directory: say which images to use with --data (e.g. digits)"
        )
    return load_eval_data(uri, img_size=img)


def default_output(model: nn.Module, name: str, output: str | os.PathLike | None) -> Path:
    if output is not None:
        return Path(output)
    info = getattr(model, "vitkit_run", None)
    if info is None:
        raise VitkitError(
            f"say where to write the {name} results with -o/--output (the model is not a run directory)"
        )
    return Path(info.path) / name


def _slug(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def _header(model: nn.Module, data: ImageDataset) -> dict[str, Any]:
    return {"model": model_label(model), "data": data.name, "images": len(data)}


def run_attack(
    spec: str,
    *,
    method: str = "pgd",
    eps: float | None = None,
    alpha: float | None = None,
    steps: int = 10,
    n: int | None = 256,
    data: str | None = None,
    patches: int = 1,
    downstream: list[str] | None = None,
    layer: int | None = None,
    search_score: str = "final",
    per_block: bool = False,
    batch_size: int = 64,
    seed: int = 0,
    output: str | None = None,
    device: str = "cpu",
) -> tuple[dict[str, Any], Path]:
    """``vitkit attack``: fgsm | pgd | pgd-l2 (robust accuracy), patch (k-patch PGD), dta."""
    if method not in ("fgsm", "pgd", "pgd-l2", "patch", "dta"):
        raise VitkitError(f"--method must be fgsm, pgd, pgd-l2, patch or dta, got '{method}'")
    if eps is None:  # defaults in pixel units: 8/255 (L∞), 0.5 (L2), anything inside a patch
        eps = {"pgd-l2": 0.5, "patch": 1.0}.get(method, 8 / 255)
    model = resolve_model(spec, device)
    if method == "dta":
        if not downstream:
            raise VitkitError("--method dta needs --downstream RUN (a model fine-tuned from this one)")
        down = {str(d): resolve_model(d, device) for d in downstream}
        first = next(iter(down.values()))
        ds = analysis_data(first, data)
        cfg = DTAConfig(
            eps=eps,
            alpha=alpha or 1 / 255,
            steps=steps,
            layer=layer,
            search_score=search_score,
            per_block=per_block,
            n=n,
            batch_size=batch_size,
            seed=seed,
        )
        res = measure_dta(model, down, ds, cfg, device=device)
        doc = {**_header(model, ds), **res.to_dict()}
        out = default_output(model, "attack-dta", output)
        with output_dir(out) as tmp:
            write_json(tmp / "dta.json", doc)
            _plot_dta(res, tmp / "dta.png")
        return doc, out
    ds = analysis_data(model, data)
    if method == "patch":
        cfg = PatchConfig(
            corruptions=(),
            patches=(patches,),
            attack=True,
            eps=eps,
            alpha=alpha or 0.1,
            steps=steps,
            n=n,
            batch_size=batch_size,
            seed=seed,
        )
        res = measure_patch_robustness(model, ds, cfg, device=device)
        doc = {**_header(model, ds), **res.to_dict()}
        out = default_output(model, "attack-patch", output)
        with output_dir(out) as tmp:
            write_json(tmp / "attack.json", doc)
            plot_patch_result(res, tmp / "attack.png", "adversarial patch attack")
        return doc, out

    results = []
    methods = ["fgsm", method] if method != "fgsm" else ["fgsm"]
    for m in methods:
        cfg = AttackConfig(
            method=m,
            eps=eps,
            alpha=alpha if m == method else None,
            steps=steps,
            n=n,
            batch_size=batch_size,
            seed=seed,
        )
        results.append(measure_attack(model, ds, cfg, device=device).to_dict())
    doc = {**_header(model, ds), "results": results}
    out = default_output(model, f"attack-{method}", output)
    with output_dir(out) as tmp:
        write_json(tmp / "attack.json", doc)
        _plot_attack(results, tmp / "attack.png")
    return doc, out


def _plot_attack(results: list[dict[str, Any]], path: Path) -> None:

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    names = ["clean"] + [r["method"] for r in results]
    vals = [results[0]["clean_accuracy"]] + [r["robust_accuracy"] for r in results]
    ax.bar(names, vals, color=["#4c72b0"] + ["#dd8452"] * len(results))
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    ax.set_title(f"ε = {results[0]['config']['eps']:.4g} ({results[-1]['config']['norm']})")
    save_figure(fig, path)


def _plot_dta(res, path: Path) -> None:

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    if res.layer_scores:
        ks = sorted(res.layer_scores)
        axes[0].plot(ks, [res.layer_scores[k] for k in ks], marker="o", color="k", label="search score")
        axes[0].axvline(res.layer, color="r", ls="--")
    axes[0].set_xlabel("attacked block")
    where = "final-feature" if res.config.get("search_score", "final") == "final" else "attacked-block"
    axes[0].set_ylabel(f"{where} 1 − cos")
    per_block = sorted(
        int(k.split("_")[1]) for k in next(iter(res.downstream.values()), {}) if k.startswith("block_")
    )
    if per_block:  # the direct test: transfer ASR when attacking each block
        ax2 = axes[0].twinx()
        for nm, r in res.downstream.items():
            ax2.plot(per_block, [r[f"block_{b}"]["attack_success_rate"] for b in per_block], ls=":", marker=".",
                     label=Path(nm).name)  # fmt: skip
        ax2.set_ylabel("downstream ASR (dotted)")
        ax2.legend(fontsize=6)
    names = list(res.downstream)
    kinds = ["dta", "last_layer", "uniform_noise"]
    w = 0.8 / len(kinds)
    for j, k in enumerate(kinds):
        axes[1].bar(
            [i + j * w for i in range(len(names))],
            [res.downstream[nm][k]["attack_success_rate"] for nm in names],
            w,
            label=k,
        )
    axes[1].set_xticks([i + w for i in range(len(names))], [Path(nm).name for nm in names], fontsize=7)
    axes[1].set_ylabel("attack success rate")
    axes[1].legend(fontsize=7)
    save_figure(fig, path)


def run_perturb(
    spec: str,
    *,
    corruptions: list[str],
    patches: list[int],
    temperatures: list[float],
    severity: int = 3,
    attack: bool = False,
    patch_size: int | None = None,
    n: int | None = 256,
    data: str | None = None,
    batch_size: int = 64,
    seed: int = 0,
    output: str | None = None,
    device: str = "cpu",
) -> tuple[dict[str, Any], Path]:
    """``vitkit perturb``: accuracy under k corrupted patches (and the patch attack) per temperature."""

    model = resolve_model(spec, device)
    ds = analysis_data(model, data)
    cfg = PatchConfig(
        corruptions=tuple(corruptions),
        severity=severity,
        patches=tuple(patches),
        temperatures=tuple(temperatures),
        attack=attack,
        patch_size=patch_size,
        n=n,
        batch_size=batch_size,
        seed=seed,
    )
    res = measure_patch_robustness(model, ds, cfg, device=device)
    doc = {**_header(model, ds), **res.to_dict()}
    out = default_output(model, "perturb", output)
    with output_dir(out) as tmp:
        write_json(tmp / "perturb.json", doc)
        plot_patch_result(res, tmp / "perturb.png")
    return doc, out


def run_similarity(
    spec_a: str,
    spec_b: str,
    *,
    metrics: list[str],
    pool: str = "mean",
    n: int | None = 256,
    data: str | None = None,
    data_b: str | None = None,
    resize: bool = True,
    batch_size: int = 64,
    seed: int = 0,
    output: str | None = None,
    device: str = "cpu",
) -> tuple[dict[str, Any], Path]:
    """``vitkit similarity``: layer × layer CKA / RSA of two models (or one model on two input sets)."""

    a = resolve_model(spec_a, device)
    b = a if spec_b == spec_a else resolve_model(spec_b, device)
    ds = analysis_data(a, data)
    ds_b = None
    if data_b is not None:
        ds_b = load_eval_data(data_b, img_size=model_input_size(b)[1])
    cfg = SimilarityConfig(
        metrics=tuple(metrics), pool=pool, n=n, batch_size=batch_size, resize=resize, seed=seed
    )
    res = measure_similarity(a, b, ds, cfg, data_b=ds_b, device=device)
    doc = {
        "model_a": model_label(a),
        "model_b": model_label(b),
        "data": ds.name,
        "data_b": ds_b.name if ds_b else None,
        **res.to_dict(),
    }
    if output is None and getattr(a, "vitkit_run", None) is not None:
        output = str(Path(a.vitkit_run.path) / f"similarity-{_slug(Path(str(spec_b)).name)}")
    out = default_output(a, "similarity", output)
    with output_dir(out) as tmp:
        write_json(tmp / "similarity.json", doc)
        plot_similarity(res, tmp / "similarity.png", (Path(str(spec_a)).name, Path(str(spec_b)).name))
    return doc, out


def run_attention(
    spec: str,
    *,
    images: int = 8,
    layers: list[int] | None = None,
    heads: str = "mean",
    rollout: bool = True,
    query: int = 0,
    data: str | None = None,
    seed: int = 0,
    output: str | None = None,
    device: str = "cpu",
) -> tuple[dict[str, Any], Path]:
    """``vitkit attention``: maps for chosen layers/heads and rollout, as overlays + JSON; for EViT /
    ToMe models also the kept / fused / merged patches per reduction block (``tokens.json`` + PNG)."""

    model = resolve_model(spec, device)
    ds = analysis_data(model, data)
    cfg = AttentionConfig(
        layers=tuple(layers or [-1]), heads=heads, rollout=rollout, query=query, n=images, seed=seed
    )
    res = measure_attention(model, ds, cfg, device=device)
    doc = {**_header(model, ds), **attention_json(res)}
    tokens = None
    if has_token_reduction(model):  # EViT / ToMe: which patches were kept, fused or merged
        tokens = measure_token_reduction(model, ds, TokenReductionConfig(n=images, seed=seed), device=device)
        doc["token_reduction"] = {**_header(model, ds), **token_reduction_json(tokens)}
    out = default_output(model, "attention", output)
    with output_dir(out) as tmp:
        write_json(tmp / "attention.json", {k: v for k, v in doc.items() if k != "token_reduction"})
        plot_attention(res, tmp / "attention.png")
        if tokens is not None:
            write_json(tmp / "tokens.json", doc["token_reduction"])
            plot_token_reduction(tokens, tmp / "tokens.png")
    return doc, out


def run_artifacts(
    spec: str,
    *,
    n: int = 32,
    max_shift: int = 1,
    denoiser: bool = False,
    denoiser_steps: int = 300,
    data: str | None = None,
    seed: int = 0,
    output: str | None = None,
    device: str = "cpu",
) -> tuple[dict[str, Any], Path]:
    """``vitkit artifacts``: the DVT position-artifact diagnostic (and optionally the denoiser)."""

    model = resolve_model(spec, device)
    ds = analysis_data(model, data)
    cfg = ArtifactConfig(
        n=n, max_shift=max_shift, denoiser=denoiser, denoiser_steps=denoiser_steps, seed=seed
    )
    res = measure_artifacts(model, ds, cfg, device=device)
    doc = {**_header(model, ds), **res.to_dict()}
    den = (doc.get("denoiser") or {}).pop("module", None)
    out = default_output(model, "artifacts", output)
    with output_dir(out) as tmp:
        write_json(tmp / "artifacts.json", doc)
        plot_artifacts(res, tmp / "artifacts.png")
        from safetensors.torch import save_file

        tensors = {"g_hat": res.g_hat.contiguous()}
        if res.g_decomposed is not None:
            tensors["g_decomposed"] = res.g_decomposed.contiguous()
        if den is not None:
            tensors.update({f"denoiser.{k}": v.detach().contiguous() for k, v in den.state_dict().items()})
        save_file(tensors, str(tmp / "position_map.safetensors"))
    return doc, out


def run_mil(
    features: str,
    bags: str,
    *,
    output: str,
    epochs: int = 60,
    lr: float = 1e-3,
    hidden: int = 128,
    gated: bool = True,
    pool: str = "mean",
    val_fraction: float = 0.3,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[dict[str, Any], Path]:
    """``vitkit mil``: gated-attention MIL on frozen features of ``features`` over a bag CSV."""
    from safetensors.torch import save_file

    model = resolve_model(features, device)
    bag_set = read_bags_csv(bags)
    cfg = MILConfig(
        hidden=hidden, gated=gated, epochs=epochs, lr=lr, val_fraction=val_fraction, pool=pool, seed=seed
    )
    res = measure_mil(model, bag_set, cfg, device=device)
    doc = {"features": model_label(model), "bags": str(bags), "num_bags": len(bag_set), **res.to_dict()}
    out = Path(output)
    with output_dir(out) as tmp:
        write_json(tmp / "metrics.json", {k: v for k, v in doc.items() if k != "attention"})
        write_json(tmp / "attention.json", doc["attention"])
        save_file(
            {k: v.detach().contiguous() for k, v in res.model.state_dict().items()},
            str(tmp / "mil_head.safetensors"),
        )
    return doc, out


__all__ = [
    "analysis_data",
    "run_artifacts",
    "run_attack",
    "run_attention",
    "run_mil",
    "run_perturb",
    "run_similarity",
]
