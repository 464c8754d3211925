"""``vitkit assemble``: Deep Model Assembling (meta model, modules trained separately, assembled and
fine-tuned; ``vitkit.stages.assemble``)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from vitkit.io import check_output
from vitkit.progress import console
from vitkit.verbs import Verb, VerbOptions, option, register_verb


class AssembleOptions(VerbOptions):
    short: ClassVar[dict[str, str]] = {"output": "-o", "config": "-c", "quiet": "-q"}

    output: Path = option(..., help="new run directory (the assembled, fine-tuned model; phases/ inside)")
    model: str = option("vitkit_tiny_p4_32", help="the target ViT (a timm VisionTransformer)")
    data: str = option("digits", help="dataset URI")
    modules: int = option(4, help="modules the target's blocks are split into")
    epochs: int = option(8, help="the budget: each phase defaults to a quarter of it")
    meta_epochs: int | None = option(None, help="epochs of the meta model [default: epochs // 4]")
    module_epochs: int | None = option(None, help="epochs of each module's training [default: epochs // 4]")
    finetune_epochs: int | None = option(
        None, help="epochs of the assembled model's fine-tuning [default: epochs // 4]"
    )
    lr: float | None = option(None, help="learning rate of every phase [default: TrainConfig's]")
    batch_size: int | None = option(None, help="batch size")
    img_size: int | None = option(None, help="input side [default: the model's]")
    seed: int = option(0, help="seed")
    threads: int | None = option(None, help="torch threads")
    config: Path | None = option(None, help="YAML of TrainConfig fields for every phase")
    resume: bool = option(False, help="reuse the phases already complete in OUTPUT/phases")
    force: bool = option(False, help="replace a non-empty output directory")
    quiet: bool = option(False, help="no progress bars")


def assemble_cmd(o: AssembleOptions) -> None:
    """Deep Model Assembling: train a meta model, each module in its place, assemble and fine-tune (torchrun: modules in parallel)."""
    if not o.resume:
        check_output(o.output, "dir", force=o.force)
    from vitkit.stages.assemble import assemble

    train: dict = {"model": o.model, "data": o.data, "epochs": o.epochs, "seed": o.seed}
    if o.config is not None:
        train["file"] = o.config
    for key in ("lr", "batch_size", "img_size", "threads"):
        if getattr(o, key) is not None:
            train[key] = getattr(o, key)
    r = assemble(
        train,
        o.output,
        modules=o.modules,
        meta_epochs=o.meta_epochs,
        module_epochs=o.module_epochs,
        finetune_epochs=o.finetune_epochs,
        resume=o.resume,
        force=o.force,
        quiet=o.quiet,
    )
    if "top1" not in r:
        return  # not the main process
    mods = ", ".join(f"{m['top1']:.3f}" for m in r["modules"])
    console.print(
        f"assemble {r['target']} (depth {r['depth']}, modules {r['split']}): meta {r['meta']['top1']:.4f}, "
        f"modules in place [{mods}], assembled + fine-tuned {r['top1']:.4f}"
    )
    console.print(f"written: {o.output}/ (the run, assemble.json, phases/)")


register_verb(Verb("assemble", AssembleOptions, assemble_cmd, panel="Train", produces=True))
