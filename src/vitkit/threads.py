"""The torch thread count when none is asked for: from the model's size and the cores that are free.

Why not torch's default (one thread per physical core): on a shared, busy 2-core machine that default
(2 threads) trained the demo's 0.2 M-parameter ViT at 7 img/s where 1 thread gave 50 img/s (issue 25).
Measured again on this 2-core machine, load 1.4-2.1 (3 s of training steps each, alternating):

* vitkit_micro_p4_16 (0.21 M params, 16x16, batch 64): 1 thread 1,590-1,670 img/s, 2 threads 120-300.
* vitkit_small_p4_32 (10.7 M params, 32x32, batch 32): 1 thread 16 img/s, 2 threads 11-13.

A small model's matmuls are too short to split: the threads spend their time waiting for each other
(and for a core, when another process holds it), so a second thread costs far more than it gains.
A larger model gains from threads only where cores are actually free.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

# Below this many parameters extra threads do not pay off (see the module docstring).
SMALL_MODEL_PARAMS = 5_000_000


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    source: str  # "requested" | "OMP_NUM_THREADS" | "auto"
    cores: int
    load: float | None
    params: int | None

    def describe(self) -> str:
        """One line, e.g. ``threads: 1 (2 cores, load 1.3, model 0.3 M params)``."""
        parts = [f"{self.cores} cores"]
        if self.load is not None:
            parts.append(f"load {self.load:.1f}")
        if self.params is not None:
            parts.append(f"model {self.params / 1e6:.2g} M params")
        if self.source != "auto":
            parts.append(f"from {'--threads' if self.source == 'requested' else self.source}")
        return f"threads: {self.threads} ({', '.join(parts)})"


def _env_threads(env: Mapping[str, str]) -> int | None:
    try:
        n = int(env.get("OMP_NUM_THREADS", "").strip())
    except ValueError:  # unset, empty or not a number: torch ignores it too
        return None
    return n if n > 0 else None


def choose_threads(
    params: int | None,
    *,
    cores: int,
    load: float | None,
    requested: int | None = None,
    env: Mapping[str, str] | None = None,
) -> ThreadChoice:
    """The torch thread count (pure: every input is an argument).

    1. ``requested`` (``--threads`` / config ``threads``) when given;
    2. else ``OMP_NUM_THREADS`` when set to a positive integer;
    3. else 1 for a model under ``SMALL_MODEL_PARAMS`` (5 M) parameters, where more threads cannot pay
       off, and otherwise the free cores: ``cores`` minus the 1-minute ``load`` average, rounded, at
       least 1 (all ``cores`` when the load is unknown). The load average counts this process too
       when it was already busy, so on an idle machine a long-running process may be given one
       thread less than the cores: the cheaper mistake on a shared machine.
    """
    cores = max(1, cores)
    if requested:
        return ThreadChoice(requested, "requested", cores, load, params)
    from_env = _env_threads(os.environ if env is None else env)
    if from_env:
        return ThreadChoice(from_env, "OMP_NUM_THREADS", cores, load, params)
    if params is not None and params < SMALL_MODEL_PARAMS:
        return ThreadChoice(1, "auto", cores, load, params)
    free = cores if load is None else round(cores - load)
    return ThreadChoice(min(cores, max(1, free)), "auto", cores, load, params)


def machine_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells, else all)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine_load() -> float | None:
    """The 1-minute load average; None where the OS has none (Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


_announced: tuple[int, str] | None = None


def set_threads_for(
    model: torch.nn.Module | None, requested: int | None = None, *, quiet: bool = False
) -> ThreadChoice:
    """Choose (see :func:`choose_threads`), apply with ``torch.set_num_threads`` and print the choice
    in one line unless ``quiet`` (once: the same choice again in this process, e.g. from many short
    trainings, is not printed again)."""
    global _announced
    params = sum(p.numel() for p in model.parameters()) if model is not None else None
    choice = choose_threads(params, cores=machine_cores(), load=machine_load(), requested=requested)
    torch.set_num_threads(choice.threads)
    key = (choice.threads, choice.source)
    if not quiet and key != _announced:
        from vitkit.progress import console

        console.print(choice.describe(), highlight=False)
        _announced = key
    return choice
