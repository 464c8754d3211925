"""The one training loop. Techniques plug in as objectives (the loss), callbacks (schedules, per-update
weight edits, SAM's optimizer step: vitkit.train.callbacks) and model transforms (the model); nothing
here knows about any particular technique.

``fit`` reads top-down: set-up (:func:`_set_up`), then per epoch one training epoch
(:func:`_train_epoch`: micro-batches through :func:`_forward_backward`, updates through
:func:`_optimizer_step`), validation (:func:`_validate_epoch`), and the checkpoint/history
bookkeeping (:class:`_Bookkeeping`); :class:`_Bars` shows progress."""

from __future__ import annotations

import contextlib
import csv
import io
import math
import random
import signal
import threading
import time
from collections.abc import Sequence
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
from vitkit.train.callbacks import Callback, CallbackList, ObjectiveHooks, TrainContext
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
    if cfg.head is not None and not task.dense:
        raise VitkitError(f"--head {cfg.head} is for dense tasks (segmentation, change), not '{task.name}'")
    if cfg.detector is not None and task.name != "detection":
        raise VitkitError(f"--detector {cfg.detector} is for task detection, not '{task.name}'")
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
    callbacks: Sequence[Callback] = (),
    run_dir: str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
    stop_after_epoch: int | None = None,
    task: Task | None = None,
) -> FitResult:
    """Train ``model`` on ``data.train``, validating on ``data.val`` every ``cfg.eval_every`` epochs.

    Writes ``checkpoint.pt`` (atomically, every epoch), ``history.csv`` and TensorBoard logs into
    ``run_dir`` when given; ``resume=True`` continues from ``run_dir/checkpoint.pt`` exactly.
    ``stop_after_epoch=k`` stops after epoch k as if interrupted there (used by tests and schedules).
    Under ``torchrun`` each process trains on its shard of every epoch's permutation (DDP).
    ``task`` (default: the one ``cfg.task`` names, for this data) gives the loss when no ``objective``
    is given and the per-epoch validation when the objective has none of its own. ``callbacks``
    (:class:`vitkit.train.Callback`) run at the loop's hooks, in order, after the objective's own.
    """
    user_callbacks = CallbackList(callbacks)  # a wrong argument fails before any work
    s = _set_up(model, data, cfg, objective, task, quiet)
    book = _Bookkeeping(s, cfg, Path(run_dir) if run_dir is not None else None, resume)
    ctx = TrainContext(
        s.raw_model,
        s.optimizer,
        cfg,
        s.steps_per_epoch,
        device=s.device,
        extra_modules=s.extra_modules,
        epoch=book.start_epoch,
        step=book.start_step,
        update=book.start_update,
    )
    hooks = CallbackList([ObjectiveHooks(s.objective), user_callbacks])
    bars = _Bars(
        s.show, cfg.epochs * s.steps_per_epoch, book.start_epoch * s.steps_per_epoch + book.start_step
    )
    last_val: dict[str, Any] = {}
    try:
        with _Interrupt() as interrupt:
            hooks.on_train_start(ctx)
            for epoch in range(book.start_epoch, cfg.epochs):
                ctx.epoch = epoch
                stats = _train_epoch(s, data, cfg, ctx, hooks, book, bars, interrupt)
                book.seconds += stats.seconds
                row = _epoch_row(s, stats, epoch)
                if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                    last_val = _validate_epoch(s, data)
                    row.update(last_val)
                book.end_epoch(ctx, row, quiet, bars)
                hooks.on_epoch_end(ctx, epoch, row)
                if interrupt.requested:
                    raise TrainingInterrupted(book.ckpt_path if s.dist.is_main else None, epoch + 1, 0)
                if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < cfg.epochs:
                    raise TrainingInterrupted(book.ckpt_path if s.dist.is_main else None, epoch + 1, 0)
            hooks.on_train_end(ctx)
    finally:
        bars.close()
        book.history.close()

    final = s.ema.module if s.ema is not None else s.raw_model
    checksums = all_gather_objects(weight_checksum(final), s.dist)
    return FitResult(
        final, book.history.rows, last_val, cfg.epochs, book.seconds, s.precision, s.dist, checksums
    )


# -- set-up -----------------------------------------------------------------------------------------
@dataclass
class _Setup:
    """What fit builds before the first step (nothing here changes during training)."""

    device: torch.device
    dist: DistInfo
    task: Task
    objective: Objective
    precision: str
    raw_model: nn.Module  # the model itself
    train_model: nn.Module  # what the objective calls: the DDP and/or compiled wrapper, or the model
    extra_modules: list[nn.Module]  # modules the objective trains alongside the model
    train_tf: BatchTransform
    eval_tf: BatchTransform
    per_rank: int  # training images per process and epoch
    batch: int
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: Any  # timm ModelEmaV3 or None
    aug_gen: torch.Generator  # augmentation randomness, re-seeded per epoch
    show: bool  # progress bars


def _set_up(
    model: nn.Module,
    data: DataSplits,
    cfg: TrainConfig,
    objective: Objective | None,
    task: Task | None,
    quiet: bool,
) -> _Setup:
    device = resolve_device(cfg.device)
    dist = init_distributed(device)
    # Not torch's default of one thread per core: that is far slower for small models on a busy machine.
    set_threads_for(model, cfg.threads, quiet=quiet or not dist.is_main)
    if task is None and getattr(objective, "task", None) == "none":
        # a label-free objective (MAE): any images will do, whatever their targets are
        from vitkit.tasks import resolve_task

        task = resolve_task(cfg.task, data)
    task = task or task_for_config(cfg, data)
    objective = objective or task.loss(cfg)

    transforms = task.batch_transforms(cfg, model, data)
    if transforms is None:
        c, h, w = model_input_size(model)
        mean, std = model_normalization(model)
        train_tf = BatchTransform(
            cfg.img_size or (h, w),
            c,
            mean,
            std,
            train=True,
            augment=augment_config(cfg),
            num_classes=data.train.num_classes,
            label_smoothing=cfg.label_smoothing,
            multilabel=data.multilabel,
        )
        eval_tf = BatchTransform(cfg.img_size or (h, w), c, mean, std, train=False)
    else:
        train_tf, eval_tf = transforms
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

    extra_modules = [m.to(device) for m in objective.trainable_modules()]
    optimizer = build_optimizer(raw_model, cfg, extra_modules)
    scheduler = build_scheduler(optimizer, cfg, updates_per_epoch)
    ema = None
    if cfg.ema_decay is not None:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(raw_model, decay=cfg.ema_decay, device=device)
    return _Setup(
        device=device,
        dist=dist,
        task=task,
        objective=objective,
        precision=precision,
        raw_model=raw_model,
        train_model=train_model,
        extra_modules=extra_modules,
        train_tf=train_tf,
        eval_tf=eval_tf,
        per_rank=per_rank,
        batch=batch,
        steps_per_epoch=steps_per_epoch,
        optimizer=optimizer,
        scheduler=scheduler,
        ema=ema,
        aug_gen=torch.Generator(),
        show=progress_enabled() and not quiet and dist.is_main,
    )


# -- one training epoch -----------------------------------------------------------------------------
@dataclass
class _EpochStats:
    loss_sum: float = 0.0
    loss_n: int = 0
    seen: int = 0  # images of this epoch, earlier sessions included
    seconds: float = 0.0  # wall time of this epoch, earlier sessions included


def _train_epoch(
    s: _Setup,
    data: DataSplits,
    cfg: TrainConfig,
    ctx: TrainContext,
    hooks: CallbackList,
    book: _Bookkeeping,
    bars: _Bars,
    interrupt: _Interrupt,
) -> _EpochStats:
    """One epoch (or the rest of an interrupted one): steps, optimizer updates, the epoch's loss."""
    epoch = ctx.epoch
    resumed = book.rng is not None and epoch == book.start_epoch  # the epoch a resumed session starts in
    first = book.start_step if resumed else 0
    ctx.step = first
    hooks.on_epoch_start(ctx, epoch)
    if cfg.mixup_off_epoch is not None:
        s.train_tf.set_mixup_enabled(epoch < cfg.mixup_off_epoch)
    # a streamed training split (webdataset shards) hands out batches in its own seeded order instead
    # of being indexed; it skips the steps already taken itself, so a resume is exact there too
    stream = getattr(data.train, "stream_batches", None)
    if stream is not None:
        batches = stream(_epoch_seed(cfg.seed, epoch), s.batch, first, s.dist.rank, s.dist.world_size)
    else:
        perm = _epoch_order(s, data, cfg, epoch)
    if resumed:
        restore_rng(book.rng, s.aug_gen)
    if first == 0:
        # Augmentation randomness is re-seeded per epoch, so an epoch replays exactly on resume.
        seed = _epoch_seed(cfg.seed, epoch, s.dist.rank)
        s.aug_gen.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
    s.raw_model.train()
    for m in s.extra_modules:
        m.train()
    stats = _EpochStats()
    carried = 0.0  # seconds of this epoch spent in an earlier session
    if first > 0 and book.partial:
        # Rank 0 wrote these sums from its own steps: under DDP only rank 0 carries them,
        # so the all-reduce at the epoch's end does not count them once per process.
        if s.dist.is_main:
            stats.loss_sum = float(book.partial.get("loss_sum", 0.0))
            stats.loss_n = int(book.partial.get("loss_n", 0))
        stats.seen = int(book.partial.get("seen", 0))
        carried = float(book.partial.get("seconds", 0.0))
    t0 = time.perf_counter()
    bars.start_epoch(epoch, cfg.epochs, s.steps_per_epoch, first, stats, s.optimizer.param_groups[0]["lr"])
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # the micro-batches of the update under way
    for step in range(first, s.steps_per_epoch):
        ctx.step = step
        hooks.on_step_start(ctx)
        if stream is not None:
            images, targets = next(batches)
        else:
            idx = perm[step * s.batch : (step + 1) * s.batch]
            images, targets = data.train.images[idx], data.train.targets[idx]
        x, y = s.train_tf(images, targets, s.aug_gen)
        x, y = x.to(s.device, non_blocking=True), y.to(s.device, non_blocking=True)
        boundary = (step + 1) % cfg.accum_steps == 0 or step + 1 == s.steps_per_epoch
        pending.append((x, y))
        loss = _forward_backward(s, cfg, ctx, book, x, y, sync=boundary)
        if boundary:
            _optimizer_step(s, cfg, ctx, hooks, book, pending)
            pending = []
        stats.loss_sum += loss.item()
        stats.loss_n += 1
        stats.seen += len(x)
        bars.step(
            epoch * s.steps_per_epoch + step + 1, step, first, stats, s.optimizer.param_groups[0]["lr"], t0
        )
        if interrupt.requested and boundary and step + 1 < s.steps_per_epoch:
            partial = {
                "loss_sum": stats.loss_sum,
                "loss_n": stats.loss_n,
                "seen": stats.seen,
                "seconds": carried + time.perf_counter() - t0,
            }
            raise TrainingInterrupted(book.save(ctx, epoch, step + 1, partial), epoch, step + 1)
    stats.seconds = carried + time.perf_counter() - t0
    if s.dist.enabled:  # every rank's steps, not rank 0's only
        stats.loss_sum, stats.loss_n = _all_reduce_sum(stats.loss_sum, stats.loss_n, s.device)
    bars.end_epoch()
    return stats


def _epoch_order(s: _Setup, data: DataSplits, cfg: TrainConfig, epoch: int) -> torch.Tensor:
    """This process's share of the epoch's order of training images (seeded by seed and epoch)."""
    g = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch))
    if cfg.sampler == "random":
        order = torch.randperm(len(data.train), generator=g)
    else:  # class-aware sampling with replacement (long-tailed data)
        labels = data.train.label_indices()
        order = sampling_indices(labels, len(data.train), g, SAMPLER_POWERS[cfg.sampler])
    return order[s.dist.rank :: s.dist.world_size][: s.per_rank]


def _forward_backward(
    s: _Setup,
    cfg: TrainConfig,
    ctx: TrainContext,
    book: _Bookkeeping,
    x: torch.Tensor,
    y: torch.Tensor,
    sync: bool,
) -> torch.Tensor:
    """The objective's loss on one micro-batch, back-propagated (scaled for accumulation). ``sync=False``
    keeps DDP from all-reducing the gradients (a micro-batch that is not the update's last)."""
    no_sync = s.dist.enabled and not sync and hasattr(s.train_model, "no_sync")
    with s.train_model.no_sync() if no_sync else contextlib.nullcontext():
        with autocast_context(s.device, s.precision):
            out = s.objective(s.train_model, x, y)
        loss = out.loss
        if not torch.isfinite(loss):
            kept = (
                f"the last good checkpoint (end of epoch {ctx.epoch}) is kept in {book.ckpt_path}"
                if (book.ckpt_path and ctx.epoch > 0)
                else "no checkpoint was written yet"
            )
            raise NonFiniteLossError(
                f"loss became {loss.item()} at epoch {ctx.epoch + 1}, step {ctx.step + 1} (update {ctx.update + 1}); "
                f"training stopped and {kept}. Lower --lr or set --clip-grad"
                + (" (or train with --precision fp32)." if s.precision == "bf16" else "."),
                ctx.epoch + 1,
                ctx.step + 1,
            )
        (loss / cfg.accum_steps).backward()
    return loss


def _optimizer_step(
    s: _Setup,
    cfg: TrainConfig,
    ctx: TrainContext,
    hooks: CallbackList,
    book: _Bookkeeping,
    pending: list[tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """One update from the accumulated gradients of ``pending``: callbacks before it, clipping, the
    optimizer step, callbacks after it (under no_grad), the LR schedule, the EMA."""
    if s.dist.enabled and s.extra_modules:
        _average_gradients(s.extra_modules, s.dist.world_size)

    def recompute() -> float:
        for p in ctx.parameters():
            p.grad = None
        total = 0.0
        for i, (x, y) in enumerate(pending):
            total += _forward_backward(s, cfg, ctx, book, x, y, sync=i + 1 == len(pending)).item()
        if s.dist.enabled and s.extra_modules:
            _average_gradients(s.extra_modules, s.dist.world_size)
        return total / len(pending)

    ctx._recompute = recompute
    try:
        hooks.before_optimizer_step(ctx)
    finally:
        ctx._recompute = None
    if cfg.clip_grad is not None:
        torch.nn.utils.clip_grad_norm_(
            [*s.raw_model.parameters(), *(p for m in s.extra_modules for p in m.parameters())],
            cfg.clip_grad,
        )
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    ctx.update += 1
    with torch.no_grad():
        hooks.after_optimizer_step(ctx)
    s.scheduler.step_update(ctx.update)
    if s.ema is not None:
        s.ema.update(s.raw_model, step=ctx.update)


# -- validation -------------------------------------------------------------------------------------
def _epoch_row(s: _Setup, stats: _EpochStats, epoch: int) -> dict[str, Any]:
    """The epoch's line of history.csv (validation metrics are added to it when the epoch has them)."""
    return {
        "epoch": epoch + 1,
        "train_loss": stats.loss_sum / max(stats.loss_n, 1),
        "lr": s.optimizer.param_groups[0]["lr"],
        "img_per_s": stats.seen * s.dist.world_size / max(stats.seconds, 1e-9),
        "epoch_seconds": stats.seconds,
    }


def _validate_epoch(s: _Setup, data: DataSplits) -> dict[str, Any]:
    """Per-epoch validation of the weights to keep (the EMA when one is kept), in training precision."""
    eval_model = s.ema.module if s.ema is not None else s.raw_model
    return validate(
        eval_model, s.objective, data, s.eval_tf, s.device, s.precision, max(256, s.batch), s.task
    )


# -- checkpoint and history bookkeeping -------------------------------------------------------------
class _Bookkeeping:
    """What outlives a session: ``checkpoint.pt`` (read on resume, written every epoch and on Ctrl-C),
    the history rows (``history.csv``) and the training time of completed epochs."""

    def __init__(self, s: _Setup, cfg: TrainConfig, run_dir: Path | None, resume: bool):
        self.s, self.cfg = s, cfg
        self.ckpt_path = run_dir / CHECKPOINT_NAME if run_dir is not None else None
        self.start_epoch, self.start_step, self.start_update = 0, 0, 0
        self.rng: dict[str, Any] | None = None  # the interrupted session's RNG state
        self.partial: dict[str, Any] = {}  # the interrupted epoch's running loss, images and time
        self.seconds = 0.0  # completed epochs only; a cut epoch's time travels in partial_epoch
        rows: list[dict] = []
        if resume:
            rows = self._resume(run_dir)
        s.scheduler.step_update(self.start_update)
        self.history = _History(run_dir if s.dist.is_main else None, rows, cfg.tensorboard)

    def _resume(self, run_dir: Path | None) -> list[dict]:
        s, ckpt_path = self.s, self.ckpt_path
        if ckpt_path is None or run_dir is None:
            raise VitkitError("resume=True needs a run directory holding checkpoint.pt")
        state = load_checkpoint(ckpt_path)
        if s.dist.is_main:
            clean_stale_temps(run_dir)  # a killed run's half-written checkpoint temp files
        check_compatible(s.raw_model.state_dict(), state["model"], str(ckpt_path))
        s.raw_model.load_state_dict(state["model"])
        s.optimizer.load_state_dict(state["optimizer"])
        if s.ema is not None and state.get("ema") is not None:
            s.ema.load_state_dict(state["ema"])
        for m, sd in zip(s.extra_modules, state.get("objective_modules") or []):
            m.load_state_dict(sd)
        self.start_epoch, self.start_step = state["epoch"], state["step_in_epoch"]
        self.start_update = state["update"]
        self.rng = state["rng"]
        # Bookkeeping of the earlier sessions (absent in older checkpoints): the training time so far
        # and the interrupted epoch's running loss, so neither counts only the last session.
        self.seconds = float(state.get("train_seconds", 0.0))
        self.partial = dict(state.get("partial_epoch") or {})
        if self.start_epoch >= self.cfg.epochs:
            raise VitkitError(
                f"{ckpt_path} already finished {self.start_epoch} of {self.cfg.epochs} epochs; raise --epochs to train longer"
            )
        return list(state.get("history", []))

    def save(
        self, ctx: TrainContext, epoch_done: int, step_in_epoch: int, partial: dict[str, float] | None = None
    ) -> Path | None:
        """Write checkpoint.pt (main process, when there is a run directory); its path, or None."""
        if self.ckpt_path is None or not self.s.dist.is_main:
            return None
        s = self.s
        return save_checkpoint(
            self.ckpt_path,
            {
                "model": s.raw_model.state_dict(),
                "optimizer": s.optimizer.state_dict(),
                "ema": s.ema.state_dict() if s.ema is not None else None,
                "objective_modules": [m.state_dict() for m in s.extra_modules],
                "epoch": epoch_done,
                "step_in_epoch": step_in_epoch,
                "update": ctx.update,
                "rng": capture_rng(s.aug_gen),
                "history": self.history.rows,
                "config": self.cfg.model_dump(mode="json"),
                "train_seconds": self.seconds,
                "partial_epoch": partial,
            },
        )

    def end_epoch(self, ctx: TrainContext, row: dict[str, Any], quiet: bool, bars: _Bars) -> None:
        """The epoch's row into history.csv (and the console), then the checkpoint."""
        self.history.add(row)
        if self.s.dist.is_main and not quiet:
            done = (ctx.epoch + 1) * self.s.steps_per_epoch
            left = bars.run_left(done) if ctx.epoch + 1 < self.cfg.epochs else None
            console.print(_format_row(row, self.cfg.epochs, left, self.s.task.headline))
        self.save(ctx, ctx.epoch + 1, 0)


# -- progress ---------------------------------------------------------------------------------------
class _Bars:
    """The run's progress: ``report`` for a surrounding stage, and on a terminal a run-level bar above
    a per-epoch one (the epoch bar alone says nothing about the run). Time left is the average wall
    time per step of this session, validation and checkpoints included."""

    def __init__(self, show: bool, run_steps: int, done0: int):
        self.run_steps, self.done0 = run_steps, done0
        self.t_session = time.perf_counter()
        self.progress: Any = None
        self.run_bar = self.epoch_bar = None
        self.own = False
        if show:
            from rich.progress import Progress

            from vitkit.progress import progress_columns, shared_progress

            # Inside a pipeline stage the bars join the stage's display (rich shows one at a time).
            self.progress = shared_progress()
            if self.progress is None:
                self.progress = Progress(*progress_columns(), console=console, transient=True)
                self.own = True
            self.run_bar = self.progress.add_task(
                "run", total=run_steps, completed=done0, info=_run_info(0.0, None)
            )
            if self.own:
                self.progress.start()
        report("training steps", done0, run_steps)

    def run_left(self, done: int) -> float | None:
        return time_left(done - self.done0, self.run_steps - self.done0, time.perf_counter() - self.t_session)

    def start_epoch(
        self, epoch: int, epochs: int, steps: int, first: int, stats: _EpochStats, lr: float
    ) -> None:
        self.seen0 = stats.seen  # images of this session, for the img/s shown
        if self.progress is None:
            return
        loss = stats.loss_sum / stats.loss_n if stats.loss_n else None
        self.epoch_steps = steps
        self.epoch_bar = self.progress.add_task(
            f"epoch {epoch + 1}/{epochs}",
            total=steps,
            completed=first,
            info=_epoch_info(loss, lr, None, None),
        )

    def step(self, done: int, step: int, first: int, stats: _EpochStats, lr: float, t0: float) -> None:
        report("training steps", done, self.run_steps)
        if self.epoch_bar is None:
            return
        elapsed = time.perf_counter() - t0
        self.progress.update(
            self.epoch_bar,
            advance=1,
            info=_epoch_info(
                stats.loss_sum / stats.loss_n,
                lr,
                (stats.seen - self.seen0) / max(elapsed, 1e-9),
                time_left(step + 1 - first, self.epoch_steps - first, elapsed),
            ),
        )
        self.progress.update(
            self.run_bar,
            completed=done,
            info=_run_info(time.perf_counter() - self.t_session, self.run_left(done)),
        )

    def end_epoch(self) -> None:
        if self.epoch_bar is not None:
            self.progress.remove_task(self.epoch_bar)
            self.epoch_bar = None

    def close(self) -> None:
        if self.own:
            self.progress.stop()
        elif self.progress is not None:
            for t in (self.epoch_bar, self.run_bar):
                if t is not None and t in self.progress.task_ids:
                    self.progress.remove_task(t)


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


def _format_row(row: dict, epochs: int, left: float | None = None, headline: str = "") -> str:
    parts = [f"epoch {row['epoch']:>3}/{epochs}", f"loss {row['train_loss']:.4f}"]
    # the task's headline metric first; the others for objectives that validate on their own
    for k in (headline, "val_top1", "val_mean_auroc", "val_map_at_r", "val_loss"):
        if k in row and row[k] is not None and not (isinstance(row[k], float) and math.isnan(row[k])):
            parts.append(f"{k} {row[k]:.4f}")
            break
    parts.append(f"{row['img_per_s']:.0f} img/s")
    if left is not None:  # the per-epoch lines are the only progress where no bar shows (logs, pipes)
        parts.append(f"run left {format_seconds(left)}")
    return "  ".join(parts)
