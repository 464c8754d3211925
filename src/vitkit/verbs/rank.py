"""``vitkit rank-configs``: As-ViT's training-free ranking of ViT configurations (issue 9).

The other small-data techniques need no verb of their own: DHVT models are timm names
(``vitkit train --model vitkit_dhvt_tiny_p4_32``) and GMM, EWA and the compressed stem are train
transforms (``vitkit train --transform gmm:k=5``, ``--transform ewa:share=0.3``,
``--transform stem:compression=2``).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from pydantic import ValidationInfo, field_validator

from vitkit.io import check_output
from vitkit.progress import console
from vitkit.verbs import Verb, VerbOptions, option, register_verb


def _ints(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{option}: expected comma-separated integers like 1,2,4, got '{text}'") from None


class RankConfigsOptions(VerbOptions):
    depths: str = option("1,2,4", help="comma-separated depths")
    widths: str = option("32,64", help="comma-separated embedding widths")
    heads: str = option("2,4", help="comma-separated head counts (must divide every width)")
    patches: str = option("2,4", help="comma-separated patch sizes (must divide --img-size)")
    img_size: int = option(16, help="input side in pixels")
    base_model: str = option("vitkit_micro_p4_16", help="preset whose depth/width/heads/patch are overridden")
    repeats: int = option(3, help="initialisations (and input curves) averaged per configuration")
    ntk_batch: int = option(16, help="images of --data for the NTK condition number (As-ViT: 16; 0: skip)")
    points: int = option(128, help="points on the input circle (As-ViT: 500)")
    train_epochs: int = option(0, help="also train each configuration this many epochs and report Kendall-τ")
    train_seeds: int = option(1, help="training seeds averaged per configuration")
    data: str = option("digits", help="dataset URI for --train-epochs")
    lr: float = option(2e-3, help="learning rate of the short trainings")
    seed: int = option(0, help="seed of the initialisations, input curves and short trainings")
    threads: int | None = option(None, help="torch threads for the short trainings")
    output: Path | None = option(
        None, "-o", "--output", help="write ranking.json, ranking.csv (and ranking.png) here"
    )
    force: bool = option(False, "--force", help="replace a non-empty output directory")

    @field_validator("depths", "widths", "heads", "patches")
    @classmethod
    def _comma_separated_integers(cls, v: str, info: ValidationInfo) -> str:
        _ints(v, str(info.field_name))
        return v


def rank_configs_cmd(o: RankConfigsOptions) -> None:
    """Rank (depth, width, heads, patch) ViT configurations by As-ViT's complexity proxy at init."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    if o.output is not None:
        check_output(o.output, "dir", force=o.force)
    from vitkit.analyze.rank import config_grid, plot_ranking, rank_configs

    specs = config_grid(
        _ints(o.depths, "depths"),
        _ints(o.widths, "widths"),
        _ints(o.heads, "heads"),
        _ints(o.patches, "patches"),
        o.img_size,
    )
    cfg = dict(
        base_model=o.base_model,
        img_size=o.img_size,
        repeats=o.repeats,
        ntk_batch=o.ntk_batch,
        complexity={"points": o.points, "seed": o.seed},
        train_epochs=o.train_epochs,
        train_seeds=o.train_seeds,
        data=o.data,
        lr=o.lr,
        seed=o.seed,
        threads=o.threads,
    )
    result = rank_configs(specs, cfg)
    _print(result)
    if o.output is not None:
        from vitkit.io import write_json, write_text
        from vitkit.runs import prepare_run_dir

        # Created only now, after the work: a failed ranking leaves no empty directory behind.
        out = prepare_run_dir(o.output, force=o.force)

        write_json(out / "ranking.json", result.to_dict())
        write_text(out / "ranking.csv", _csv(result.rows))
        written = "ranking.json, ranking.csv"
        if result.kendall_tau is not None:
            plot_ranking(result, out / "ranking.png")
            written += ", ranking.png"
        console.print(f"written: {out}/ ({written})")


def _print(result) -> None:
    from rich.table import Table

    trained = any("val_top1" in r for r in result.rows)
    ntk = any("ntk_cond" in r for r in result.rows)
    t = Table(title="configurations ranked by As-ViT complexity at init (higher first)")
    cols = ("rank", "config", "parameters", "complexity") + (("NTK κ",) if ntk else ())
    for col in cols + (("val top-1",) if trained else ()):
        t.add_column(col, justify="right" if col != "config" else "left")
    for i, r in enumerate(result.rows, 1):
        cells = [str(i), r["name"], f"{r['parameters']:,}", f"{r['complexity']:.4g}"]
        if ntk:
            cells.append(f"{r['ntk_cond']:.4g}")
        if trained:
            cells.append(f"{r['val_top1']:.3f}")
        t.add_row(*cells)
    console.print(t)
    if result.kendall_tau is not None:
        console.print(
            f"Kendall-τ (complexity vs val top-1): {result.kendall_tau:.3f} (p = {result.p_value:.3g}); "
            f"parameter count vs val top-1: {result.params_kendall_tau:.3f}"
        )
    if result.ntk_kendall_tau is not None:
        console.print(
            f"Kendall-τ (-NTK κ vs val top-1): {result.ntk_kendall_tau:.3f}; rank sum of both proxies: "
            f"{result.combined_kendall_tau:.3f}"
        )


def _csv(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k not in ("complexity_repeats", "ntk_cond_repeats")]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


register_verb(Verb("rank-configs", RankConfigsOptions, rank_configs_cmd, panel="Analyze"))
