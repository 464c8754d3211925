"""``vitkit assemble``: Deep Model Assembling — Ni, Wang, Wang, Song & Huang, "Deep Model Assembling"
(arXiv 2022; published as "Deep Incubation: Training Large Models by Divide-and-Conquering", ICCV
2023); read from LeapLabTHU/Deep-Incubation @9a7061b (``main.py``, the ``divided_depths`` ViT of
its vendored ``timm/models/vision_transformer.py``, ``TRAINING.md``).

The target ViT (any timm ``VisionTransformer``: a vitkit preset, ``depth`` D) is split into K modules
of D / K consecutive blocks; module 0 also owns the patch embedding, class/register tokens and the
position embedding, module K-1 the final norm and the head (the official ``_register_modules``).

1. **Meta model** (phase ``PT``): the same ViT with one block per module (depth K), trained end to end.
2. **Modular training** (``MT``), one run per module k, independent: the hybrid network is the meta
   model with its module k replaced by the target's (freshly initialised) module k; only module k is
   trained, against the hybrid's output with the usual loss; the meta modules are frozen (they stay
   in train mode, as in the official code: with the default drop-path of 0 that changes nothing).
   Under ``torchrun`` the modules are shared out over the processes (module k on process
   k mod world size), each trained by its process alone: the "in parallel" of the paper.
3. **Assembly and fine-tuning** (``FT``): module k of the target is module k of the k-th hybrid; the
   assembled ViT is fine-tuned end to end without warm-up and with the gradient norm clipped at 1
   (the official FT recipe).

The phases' runs are kept in ``OUTPUT/phases/{meta,module-K,finetune}``; the fine-tuned model is the
run in ``OUTPUT`` itself (a plain timm ViT classifier run that every other stage takes), with
``assemble.json`` recording every phase's accuracy and time. A phase whose run is complete is reused
when the stage is run again with ``resume`` (so a failure costs only the phase it happened in).
Simplified against the paper: the recipe is vitkit's (no linear LR scaling by batch, the loop's
scheduler), the epoch budget is whatever the caller gives each phase.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitkit.config.train import TrainConfig, build_config
from vitkit.errors import VitkitError
from vitkit.io import read_json, write_json
from vitkit.models import create_model
from vitkit.progress import console
from vitkit.runs import CHECKPOINT_NAME, check_run_dir

PREFIX_PARAMS = ("cls_token", "reg_token", "pos_embed", "patch_embed.", "norm_pre.")
RUN_FILES = ("model.json", "model.safetensors", "metrics.json", "config.yaml", "classes.yaml", "history.csv")


@dataclass(frozen=True)
class Split:
    """Blocks per module of the target (``depths``) and of a model built from it."""

    depths: tuple[int, ...]

    @property
    def starts(self) -> list[int]:
        out, s = [], 0
        for d in self.depths:
            out.append(s)
            s += d
        return out

    def module_of(self, name: str) -> tuple[int, int | None]:
        """(module, block offset inside it) of a parameter; offset None for non-block parameters."""
        if name.startswith("blocks."):
            i = int(name.split(".")[1])
            for k, (start, d) in enumerate(zip(self.starts, self.depths)):
                if start <= i < start + d:
                    return k, i - start
            raise VitkitError(f"assemble: block {i} lies outside the split {self.depths}")
        if name.startswith(PREFIX_PARAMS):
            return 0, None
        return len(self.depths) - 1, None

    def rename(self, name: str, module: int, offset: int | None) -> str:
        """``name`` in a model with this split, for a parameter of ``module`` at block ``offset``."""
        if offset is None:
            return name
        rest = name.split(".", 2)[2]
        return f"blocks.{self.starts[module] + offset}.{rest}"


def split_depth(depth: int, modules: int) -> tuple[int, ...]:
    if modules < 2 or modules > depth:
        raise VitkitError(f"--modules {modules}: expected 2 to the target's depth ({depth})")
    base, extra = divmod(depth, modules)
    return tuple(base + (1 if k < extra else 0) for k in range(modules))


def hybrid_split(target: Split, module: int) -> Split:
    return Split(tuple(d if k == module else 1 for k, d in enumerate(target.depths)))


def copy_module(dst: nn.Module, dst_split: Split, src: nn.Module, src_split: Split, module: int) -> int:
    """Copy every parameter and buffer of ``module`` from ``src`` into ``dst``; returns how many tensors."""
    src_state = src.state_dict()
    dst_state = dst.state_dict()
    n = 0
    with torch.no_grad():
        for name, value in dst_state.items():
            k, offset = dst_split.module_of(name)
            if k != module:
                continue
            src_name = src_split.rename(name, k, offset) if offset is not None else name
            if src_name not in src_state or src_state[src_name].shape != value.shape:
                raise VitkitError(
                    f"assemble: {src_name} of module {module} does not fit {name} {tuple(value.shape)}"
                )
            value.copy_(src_state[src_name])
            n += 1
    return n


def _check_vit(model: nn.Module, name: str) -> int:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or not hasattr(model, "patch_embed"):
        raise VitkitError(f"assemble: '{name}' is not a plain timm ViT (blocks + patch_embed)")
    return len(blocks)


def _complete(run: Path) -> bool:
    return all((run / f).is_file() for f in ("model.json", "model.safetensors", "metrics.json"))


def _phase(
    cfg: TrainConfig, out: Path, model: nn.Module, quiet: bool, resume: bool
) -> tuple[dict, float, bool]:
    """Train ``model`` into ``out`` (or reuse a complete earlier run there); (metrics, seconds, reused)."""
    from vitkit.stages.train import train_model

    if resume and _complete(out):
        return read_json(out / "metrics.json"), 0.0, True
    t0 = time.perf_counter()
    carry_on = resume and (out / CHECKPOINT_NAME).is_file()
    run = train_model(cfg, out, model=model, quiet=quiet, resume=carry_on, force=not carry_on)
    return run.metrics, time.perf_counter() - t0, False


def assemble(
    train: dict[str, Any],
    output: str | os.PathLike,
    *,
    modules: int = 4,
    meta_epochs: int | None = None,
    module_epochs: int | None = None,
    finetune_epochs: int | None = None,
    resume: bool = False,
    force: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Meta model, modules, assembly + fine-tuning (module docstring). ``train``: TrainConfig fields of
    the target (model, data, epochs, lr, ...); each phase defaults to ``epochs // 4`` epochs (at least
    1), the split of the paper's budget the notes compare at. Returns the report written to
    ``OUTPUT/assemble.json``."""
    from vitkit.models import model_input_size
    from vitkit.runs import load
    from vitkit.train.distributed import barrier, init_distributed, process_local
    from vitkit.train.loop import resolve_device

    base = build_config(**train)
    out = Path(output)
    if not resume:
        check_run_dir(out, force=force)
    quarter = max(1, base.epochs // 4)
    epochs = {
        "meta": meta_epochs or quarter,
        "module": module_epochs or quarter,
        "finetune": finetune_epochs or quarter,
    }
    probe = create_model(
        base.model, num_classes=1, img_size=base.img_size, in_chans=base.in_chans, **base.model_kwargs
    )
    depth = _check_vit(probe, base.model)
    target = Split(split_depth(depth, modules))
    phases = out / "phases"
    dist = init_distributed(resolve_device(base.device))
    if dist.is_main and not resume and out.exists() and force:
        shutil.rmtree(out)
    barrier(dist)
    kwargs = dict(base.model_kwargs)
    report: dict[str, Any] = {
        "target": base.model,
        "depth": depth,
        "split": list(target.depths),
        "epochs": epochs,
    }

    def phase_cfg(phase: str, **extra: Any) -> TrainConfig:
        return base.model_copy(
            update={
                "epochs": epochs[phase],
                "warmup_epochs": min(base.warmup_epochs, epochs[phase] - 1) if epochs[phase] > 1 else 0,
                **extra,
            }
        )

    # 1. the meta model: one block per module
    meta_kwargs = {**kwargs, "depth": modules}
    cfg = phase_cfg("meta", model_kwargs=meta_kwargs)
    meta_metrics, secs, reused = _phase(cfg, phases / "meta", None, quiet, resume)
    report["meta"] = {"top1": meta_metrics.get("top1"), "seconds": round(secs, 1), "reused": reused}
    barrier(dist)
    meta = load(phases / "meta")
    meta_split = Split((1,) * modules)
    if not quiet and dist.is_main:
        console.print(
            f"assemble: meta model (depth {modules}) top-1 {meta_metrics.get('top1', float('nan')):.4f}"
        )

    # 2. the modules, each in the meta model's place; shared out over torchrun's processes
    t_modules = time.perf_counter()
    report["modules"] = [None] * modules
    for k in range(modules):
        if k % dist.world_size != dist.rank:
            continue
        split = hybrid_split(target, k)
        hyb_kwargs = {**kwargs, "depth": sum(split.depths)}
        cfg = phase_cfg("module", model_kwargs=hyb_kwargs)
        torch.manual_seed(cfg.seed + 1 + k)
        hybrid = create_model(
            cfg.model,
            num_classes=meta.num_classes,
            img_size=base.img_size,
            in_chans=base.in_chans,
            **hyb_kwargs,
        )
        for j in range(modules):
            if j != k:
                copy_module(hybrid, split, meta, meta_split, j)
        for name, p in hybrid.named_parameters():
            p.requires_grad_(split.module_of(name)[0] == k)
        with process_local():
            m, secs, reused = _phase(cfg, phases / f"module-{k}", hybrid, quiet, resume)
        report["modules"][k] = {
            "top1": m.get("top1"),
            "seconds": round(secs, 1),
            "reused": reused,
            "blocks": target.depths[k],
        }
    barrier(dist)
    report["modules_wall_seconds"] = round(time.perf_counter() - t_modules, 1)

    # 3. assemble the modules into the target and fine-tune it end to end
    torch.manual_seed(base.seed)
    model = create_model(
        base.model, num_classes=meta.num_classes, img_size=base.img_size, in_chans=base.in_chans, **kwargs
    )
    for k in range(modules):
        hybrid = load(phases / f"module-{k}")
        copy_module(model, target, hybrid, hybrid_split(target, k), k)
    c, h, w = model_input_size(model)
    cfg = phase_cfg("finetune", warmup_epochs=0, clip_grad=1.0)
    ft_metrics, secs, reused = _phase(cfg, phases / "finetune", model, quiet, resume)
    report["finetune"] = {"top1": ft_metrics.get("top1"), "seconds": round(secs, 1), "reused": reused}
    if dist.is_main:
        for f in RUN_FILES:  # the fine-tuned model is the run in OUTPUT itself
            if (phases / "finetune" / f).is_file():
                shutil.copy2(phases / "finetune" / f, out / f)
        for k in range(modules):  # modules trained by other processes: read back their metrics
            if report["modules"][k] is None and _complete(phases / f"module-{k}"):
                m = read_json(phases / f"module-{k}" / "metrics.json")
                report["modules"][k] = {
                    "top1": m.get("top1"),
                    "seconds": m.get("train_seconds"),
                    "reused": False,
                    "blocks": target.depths[k],
                }
        report["top1"] = ft_metrics.get("top1")
        report["world_size"] = dist.world_size
        report["input_size"] = [c, h, w]
        write_json(out / "assemble.json", report)
    barrier(dist)
    return report
