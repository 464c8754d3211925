"""The one training loop. Techniques plug in as objectives (the loss) and model transforms (the model);
nothing here knows about any particular technique."""

from __future__ import annotations

import contextlib
import csv
import io
import math
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from vitkit.data import AugmentConfig, BatchTransform, DataSplits
from vitkit.errors import NonFiniteLossError, VitkitError
from vitkit.io import write_text
from vitkit.models import model_input_size, model_normalization
from vitkit.progress import console, format_seconds, progress_enabled, report, time_left
from vitkit.threads import set_threads_for
from vitkit.train.checkpoint import (
    CHECKPOINT_NAME,
    capture_rng,
    check_compatible,
    clean_stale_temps,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from vitkit.train.config import TrainConfig
from vitkit.train.distributed import DistInfo, all_gather_objects, init_distributed
from vitkit.train.evaluate import autocast_context
from vitkit.train.longtail import SAMPLER_POWERS, sampling_indices
from vitkit.train.objectives import Objective
from vitkit.train.optim import build_optimizer, build_scheduler
from vitkit.train.precision import resolve_precision

if TYPE_CHECKING:
    from vitkit.tasks import Task


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C once the checkpoint is safely written."""

    def __init__(self, checkpoint: Path | None, epoch: int, step: int):
        where = f"; checkpoint saved to {checkpoint}" if checkpoint else ""
        super().__init__(f"training interrupted in epoch {epoch + 1} after step {step}{where}")
        self.checkpoint, self.epoch, self.step = checkpoint, epoch, step


@dataclass
class FitResult:
    model: nn.Module  # the weights to keep (the EMA when one was kept)
    history: list[dict[str, Any]]
    val_metrics: dict[str, Any]
    epochs_completed: int
    train_seconds: float
    precision: str
    dist: DistInfo = field(default_factory=DistInfo)
    weight_checksums: list[float] = field(default_factory=list)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise VitkitError(f"unknown device '{device}' (expected auto, cpu, cuda, cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VitkitError(f"device '{device}' asked for, but no CUDA device is available")
    return dev


def task_for_config(cfg: TrainConfig, data: DataSplits) -> Task:
    """The task ``cfg.task`` names, for this data (classification on multi-label data is multi-label),
    with the data and the options checked against it."""
    from vitkit.tasks import resolve_task

    task = resolve_task(cfg.task, data)
    task.check_data(data)
    task.check_config(cfg)
    return task


def default_objective(cfg: TrainConfig, multilabel: bool) -> Objective:
    """The loss of ``cfg.task`` (kept for callers that have no data object at hand)."""
    from vitkit.tasks import get_task

    task = get_task(cfg.task)
    if task.name == "classification" and multilabel:
        task = get_task("multilabel")
    return task.loss(cfg)


def augment_config(cfg: TrainConfig) -> AugmentConfig:
    return AugmentConfig(
        scale=(cfg.scale_min, 1.0),
        translate=cfg.translate,
        hflip=cfg.hflip,
        randaug=cfg.randaug,
        mixup=cfg.mixup,
        cutmix=cfg.cutmix,
        reprob=cfg.reprob,
    )


def _epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % (2**31)


class _Interrupt:
    """First Ctrl-C asks the loop to stop at the next update boundary; a second one stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class _History:
    """Per-epoch rows in history.csv (rewritten atomically) and TensorBoard scalars."""

    def __init__(self, run_dir: Path | None, rows: list[dict], tensorboard: bool):
        self.run_dir, self.rows = run_dir, rows
        self.writer = None
        if run_dir is not None and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but a broken install should not stop training
                self.writer = None

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if self.run_dir is None:
            return
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.rows)
        write_text(self.run_dir / "history.csv", buf.getvalue())
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.writer.add_scalar(k, v, row["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def validate(
    model: nn.Module,
    objective: Objective,
    data: DataSplits,
    transform: BatchTransform,
    device: torch.device,
    precision: str,
    batch_size: int,
    task: Task | None = None,
) -> dict[str, Any]:
    """Per-epoch validation: the objective's own ``validate`` if it has one, else the task's."""
    custom = getattr(objective, "validate", None)
    if custom is not None:
        return custom(model, data.val, transform, device, precision, batch_size)
    if task is None:
        from vitkit.tasks import task_for_data

        task = task_for_data(data)
    return task.validate(model, data.val, transform, device, precision, batch_size)


def fit(
    model: nn.Module,
    data: DataSplits,
    cfg: TrainConfig,
    *,
    objective: Objective | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
    stop_after_epoch: int | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    task: Task | None = None,
) -> FitResult:
    """Train ``model`` on ``data.train``, validating on ``data.val`` every ``cfg.eval_every`` epochs.

    Writes ``checkpoint.pt`` (atomically, every epoch), ``history.csv`` and TensorBoard logs into
    ``run_dir`` when given; ``resume=True`` continues from ``run_dir/checkpoint.pt`` exactly.
    ``stop_after_epoch=k`` stops after epoch k as if interrupted there (used by tests and schedules).
    Under ``torchrun`` each process trains on its shard of every epoch's permutation (DDP).
    ``task`` (default: the one ``cfg.task`` names, for this data) gives the loss when no ``objective``
    is given and the per-epoch validation when the objective has none of its own.
    """
    device = resolve_device(cfg.device)
    dist = init_distributed(device)
    # Not torch's default of one thread per core: that is far slower for small models on a busy machine.
    set_threads_for(model, cfg.threads, quiet=quiet or not dist.is_main)
    run_dir = Path(run_dir) if run_dir is not None else None
    task = task or task_for_config(cfg, data)
    objective = objective or task.loss(cfg)
    # Optional, so objectives written as plain duck-typed classes keep working.
    after_update = getattr(objective, "after_update", None)
    show = progress_enabled() and not quiet and dist.is_main

    c, h, w = model_input_size(model)
    mean, std = model_normalization(model)
    num_classes = data.train.num_classes
    train_tf = BatchTransform(
        cfg.img_size or (h, w),
        c,
        mean,
        std,
        train=True,
        augment=augment_config(cfg),
        num_classes=num_classes,
        label_smoothing=cfg.label_smoothing,
        multilabel=data.multilabel,
    )
    eval_tf = BatchTransform(cfg.img_size or (h, w), c, mean, std, train=False)
    img_hw = (cfg.img_size, cfg.img_size) if cfg.img_size else None
    precision = resolve_precision(cfg.precision, device, model, img_hw)

    raw_model = model.to(device)
    train_model: nn.Module = raw_model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(
            raw_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        train_model = torch.compile(train_model)

    n = len(data.train)
    per_rank = n // dist.world_size
    batch = min(cfg.batch_size, per_rank)
    if batch < 1:
        raise VitkitError(
            f"{data.train.name}: {n} training images cannot be shared by {dist.world_size} processes"
        )
    steps_per_epoch = per_rank // batch
    updates_per_epoch = max(1, steps_per_epoch // cfg.accum_steps)

    # Modules an objective trains alongside the model (e.g. feature-distillation projectors).
    extra_modules = [m.to(device) for m in objective.trainable_modules()]
    optimizer = build_optimizer(raw_model, cfg, extra_modules)
    scheduler = build_scheduler(optimizer, cfg, updates_per_epoch)
    ema = None
    if cfg.ema_decay is not None:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(raw_model, decay=cfg.ema_decay, device=device)

    start_epoch, start_step, update = 0, 0, 0
    resume_seconds, resume_partial = 0.0, {}
    history_rows: list[dict] = []
    ckpt_path = run_dir / CHECKPOINT_NAME if run_dir is not None else None
    resume_rng = None
    if resume:
        if ckpt_path is None:
            raise VitkitError("resume=True needs a run directory holding checkpoint.pt")
        state = load_checkpoint(ckpt_path)
        if dist.is_main:
            clean_stale_temps(run_dir)  # a killed run's half-written checkpoint temp files
        check_compatible(raw_model.state_dict(), state["model"], str(ckpt_path))
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        for m, sd in zip(extra_modules, state.get("objective_modules") or []):
            m.load_state_dict(sd)
        start_epoch, start_step, update = state["epoch"], state["step_in_epoch"], state["update"]
        history_rows = list(state.get("history", []))
        resume_rng = state["rng"]
        # Bookkeeping of the earlier sessions (absent in older checkpoints): the training time so far
        # and the interrupted epoch's running loss, so neither counts only the last session.
        resume_seconds = float(state.get("train_seconds", 0.0))
        resume_partial = dict(state.get("partial_epoch") or {})
        if start_epoch >= cfg.epochs:
            raise VitkitError(
                f"{ckpt_path} already finished {start_epoch} of {cfg.epochs} epochs; raise --epochs to train longer"
            )
    scheduler.step_update(update)

    history = _History(run_dir if dist.is_main else None, history_rows, cfg.tensorboard)
    aug_gen = torch.Generator()
    last_val: dict[str, Any] = {}
    t_train = resume_seconds  # completed epochs only; a cut epoch's time travels in partial_epoch
    epoch = start_epoch
    step = start_step

    def checkpoint_state(
        epoch_done: int, step_in_epoch: int, partial: dict[str, float] | None = None
    ) -> dict[str, Any]:
        return {
            "model": raw_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "objective_modules": [m.state_dict() for m in extra_modules],
            "epoch": epoch_done,
            "step_in_epoch": step_in_epoch,
            "update": update,
            "rng": capture_rng(aug_gen),
            "history": history.rows,
            "config": cfg.model_dump(mode="json"),
            "train_seconds": t_train,
            "partial_epoch": partial,
        }

    # Steps of the whole run, for its time left: the average wall time per step of this session,
    # validation and checkpoints included (so the estimate covers them too).
    run_steps = cfg.epochs * steps_per_epoch
    run_done0 = start_epoch * steps_per_epoch + start_step
    t_session = time.perf_counter()

    def run_left(done: int) -> float | None:
        return time_left(done - run_done0, run_steps - run_done0, time.perf_counter() - t_session)

    progress = run_bar = epoch_bar = None
    own_progress = False
    if show:
        from rich.progress import Progress

        from vitkit.progress import progress_columns, shared_progress

        # Inside a pipeline stage the bars join the stage's display (rich shows one at a time).
        progress = shared_progress()
        if progress is None:
            progress = Progress(*progress_columns(), console=console, transient=True)
            own_progress = True
        # A run-level bar above the per-epoch one: the epoch bar alone says nothing about the run.
        run_bar = progress.add_task("run", total=run_steps, completed=run_done0, info=_run_info(0.0, None))
        if own_progress:
            progress.start()
    report("training steps", run_done0, run_steps)

    try:
        with _Interrupt() as interrupt:
            for epoch in range(start_epoch, cfg.epochs):
                objective.on_epoch_start(epoch, cfg.epochs)
                if cfg.mixup_off_epoch is not None:
                    train_tf.set_mixup_enabled(epoch < cfg.mixup_off_epoch)
                g = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch))
                if cfg.sampler == "random":
                    order = torch.randperm(n, generator=g)
                else:  # class-aware sampling with replacement (long-tailed data)
                    labels = data.train.label_indices()
                    order = sampling_indices(labels, n, g, SAMPLER_POWERS[cfg.sampler])
                perm = order[dist.rank :: dist.world_size][:per_rank]
                first = 0
                if resume_rng is not None and epoch == start_epoch:
                    restore_rng(resume_rng, aug_gen)
                    first = start_step
                if first == 0:
                    # Augmentation randomness is re-seeded per epoch, so an epoch replays exactly on resume.
                    seed = _epoch_seed(cfg.seed, epoch, dist.rank)
                    aug_gen.manual_seed(seed)
                    random.seed(seed)
                    np.random.seed(seed)
                raw_model.train()
                for m in extra_modules:
                    m.train()
                loss_sum, loss_n, seen, t0 = 0.0, 0, 0, time.perf_counter()
                carried = 0.0  # seconds of this epoch spent in an earlier session
                if first > 0 and resume_partial:
                    # Rank 0 wrote these sums from its own steps: under DDP only rank 0 carries them,
                    # so the all-reduce at the epoch's end does not count them once per process.
                    if dist.is_main:
                        loss_sum = float(resume_partial.get("loss_sum", 0.0))
                        loss_n = int(resume_partial.get("loss_n", 0))
                    seen = int(resume_partial.get("seen", 0))
                    carried = float(resume_partial.get("seconds", 0.0))
                seen0 = seen  # images of this session, for the img/s shown
                epoch_bar = (
                    progress.add_task(
                        f"epoch {epoch + 1}/{cfg.epochs}",
                        total=steps_per_epoch,
                        completed=first,
                        info=_epoch_info(
                            loss_sum / loss_n if loss_n else None, optimizer.param_groups[0]["lr"], None, None
                        ),
                    )
                    if progress
                    else None
                )
                for step in range(first, steps_per_epoch):
                    idx = perm[step * batch : (step + 1) * batch]
                    x, y = train_tf(data.train.images[idx], data.train.targets[idx], aug_gen)
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    boundary = (step + 1) % cfg.accum_steps == 0 or step + 1 == steps_per_epoch
                    sync = dist.enabled and not boundary
                    with (
                        train_model.no_sync()
                        if sync and hasattr(train_model, "no_sync")
                        else contextlib.nullcontext()
                    ):
                        with autocast_context(device, precision):
                            out = objective(train_model, x, y)
                        loss = out.loss
                        if not torch.isfinite(loss):
                            kept = (
                                f"the last good checkpoint (end of epoch {epoch}) is kept in {ckpt_path}"
                                if (ckpt_path and epoch > 0)
                                else "no checkpoint was written yet"
                            )
                            raise NonFiniteLossError(
                                f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} (update {update + 1}); "
                                f"training stopped and {kept}. Lower --lr or set --clip-grad"
                                + (" (or train with --precision fp32)." if precision == "bf16" else "."),
                                epoch + 1,
                                step + 1,
                            )
                        (loss / cfg.accum_steps).backward()
                    if boundary:
                        if dist.enabled and extra_modules:
                            _average_gradients(extra_modules, dist.world_size)
                        if cfg.clip_grad is not None:
                            torch.nn.utils.clip_grad_norm_(
                                [
                                    *raw_model.parameters(),
                                    *(p for m in extra_modules for p in m.parameters()),
                                ],
                                cfg.clip_grad,
                            )
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        update += 1
                        if after_update is not None:
                            with torch.no_grad():
                                after_update(raw_model, update)
                        scheduler.step_update(update)
                        if ema is not None:
                            ema.update(raw_model, step=update)
                    loss_sum += loss.item()
                    loss_n += 1
                    seen += len(x)
                    done = epoch * steps_per_epoch + step + 1
                    report("training steps", done, run_steps)
                    if epoch_bar is not None:
                        elapsed = time.perf_counter() - t0
                        progress.update(
                            epoch_bar,
                            advance=1,
                            info=_epoch_info(
                                loss_sum / loss_n,
                                optimizer.param_groups[0]["lr"],
                                (seen - seen0) / max(elapsed, 1e-9),
                                time_left(step + 1 - first, steps_per_epoch - first, elapsed),
                            ),
                        )
                        progress.update(
                            run_bar,
                            completed=done,
                            info=_run_info(time.perf_counter() - t_session, run_left(done)),
                        )
                    if interrupt.requested and boundary and step + 1 < steps_per_epoch:
                        saved = None
                        if ckpt_path is not None and dist.is_main:
                            partial = {
                                "loss_sum": loss_sum,
                                "loss_n": loss_n,
                                "seen": seen,
                                "seconds": carried + time.perf_counter() - t0,
                            }
                            saved = save_checkpoint(ckpt_path, checkpoint_state(epoch, step + 1, partial))
                        raise TrainingInterrupted(saved, epoch, step + 1)
                epoch_time = carried + time.perf_counter() - t0
                t_train += epoch_time
                if dist.enabled:  # every rank's steps, not rank 0's only
                    loss_sum, loss_n = _all_reduce_sum(loss_sum, loss_n, device)
                if epoch_bar is not None:
                    progress.remove_task(epoch_bar)

                row: dict[str, Any] = {
                    "epoch": epoch + 1,
                    "train_loss": loss_sum / max(loss_n, 1),
                    "lr": optimizer.param_groups[0]["lr"],
                    "img_per_s": seen * dist.world_size / max(epoch_time, 1e-9),
                    "epoch_seconds": epoch_time,
                }
                if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                    eval_model = ema.module if ema is not None else raw_model
                    last_val = validate(
                        eval_model, objective, data, eval_tf, device, precision, max(256, batch), task
                    )
                    row.update(last_val)
                history.add(row)
                if dist.is_main and not quiet:
                    left = run_left((epoch + 1) * steps_per_epoch) if epoch + 1 < cfg.epochs else None
                    console.print(_format_row(row, cfg.epochs, left))
                if ckpt_path is not None and dist.is_main:
                    save_checkpoint(ckpt_path, checkpoint_state(epoch + 1, 0))
                if on_epoch_end is not None:
                    on_epoch_end(epoch, row)
                if interrupt.requested:
                    raise TrainingInterrupted(ckpt_path if dist.is_main else None, epoch + 1, 0)
                if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < cfg.epochs:
                    raise TrainingInterrupted(ckpt_path if dist.is_main else None, epoch + 1, 0)
    finally:
        if own_progress:
            progress.stop()
        elif progress is not None:
            for t in (epoch_bar, run_bar):
                if t is not None and t in progress.task_ids:
                    progress.remove_task(t)
        history.close()

    final = ema.module if ema is not None else raw_model
    checksums = all_gather_objects(weight_checksum(final), dist)
    return FitResult(final, history.rows, last_val, cfg.epochs, t_train, precision, dist, checksums)


def _all_reduce_sum(total: float, count: int, device: torch.device) -> tuple[float, int]:
    """Sum a running loss and its step count over all processes (float64: exact for the counts)."""
    import torch.distributed as tdist

    t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return float(t[0]), int(t[1])


def _average_gradients(modules: list[nn.Module], world_size: int) -> None:
    """All-reduce the gradients of modules DDP does not wrap (an objective's own modules)."""
    import torch.distributed as tdist

    for m in modules:
        for p in m.parameters():
            if p.grad is not None:
                tdist.all_reduce(p.grad)
                p.grad.div_(world_size)


def weight_checksum(model: nn.Module) -> float:
    """A float64 fingerprint of all parameters (equal weights ⇒ equal checksums)."""
    with torch.no_grad():
        return float(sum(p.double().sum().item() * (i + 1) for i, p in enumerate(model.parameters())))


def _epoch_info(loss: float | None, lr: float, ips: float | None, left: float | None) -> str:
    """The epoch bar's text; ``loss –`` until the first step has a loss (not ``loss nan``)."""
    return (
        f"loss {'–' if loss is None else format(loss, '.4f')}  lr {lr:.2e}  "
        f"{'–' if ips is None else format(ips, '.0f')} img/s  epoch left {format_seconds(left)}"
    )


def _run_info(elapsed: float, left: float | None) -> str:
    return f"elapsed {format_seconds(elapsed)}  run left {format_seconds(left)}"


def _format_row(row: dict, epochs: int, left: float | None = None) -> str:
    parts = [f"epoch {row['epoch']:>3}/{epochs}", f"loss {row['train_loss']:.4f}"]
    for k in ("val_top1", "val_mean_auroc", "val_map_at_r", "val_loss"):
        if k in row and row[k] is not None and not (isinstance(row[k], float) and math.isnan(row[k])):
            parts.append(f"{k} {row[k]:.4f}")
            break
    parts.append(f"{row['img_per_s']:.0f} img/s")
    if left is not None:  # the per-epoch lines are the only progress where no bar shows (logs, pipes)
        parts.append(f"run left {format_seconds(left)}")
    return "  ".join(parts)
