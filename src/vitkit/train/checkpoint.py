"""Training checkpoints: everything needed to resume bit-exactly, written atomically, loaded without
unpickling arbitrary objects (``torch.load(weights_only=True)``)."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitkit.errors import VitkitError, upstream_reason
from vitkit.io import atomic_path

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 1


# The files a training run writes with vitkit.io.atomic_path, whose temp files are ".NAME.XXXXXXXX.tmp".
RUN_FILES = frozenset(
    {
        CHECKPOINT_NAME,
        "model.safetensors",
        "model.json",
        "metrics.json",
        "history.csv",
        "config.yaml",
        "classes.yaml",
        "confusion_matrix.png",
        "recall_at_k.png",
    }
)
_TEMP = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")


def clean_stale_temps(run_dir: str | os.PathLike) -> list[Path]:
    """Remove temp files a killed process left behind (``kill -9`` during a checkpoint write leaves
    ``.checkpoint.pt.XXXXXXXX.tmp``). Only our own pattern for the run's own files, and only when the
    run is resumed or finished: then no other process is writing them."""
    removed = []
    d = Path(run_dir)
    if not d.is_dir():
        return removed
    for p in d.iterdir():
        m = _TEMP.match(p.name)
        if m and m["name"] in RUN_FILES and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def capture_rng(aug_generator: torch.Generator | None = None) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": random.getstate(),
        "aug": aug_generator.get_state() if aug_generator is not None else None,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], aug_generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if aug_generator is not None and state.get("aug") is not None:
        aug_generator.set_state(state["aug"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    state = {"version": CHECKPOINT_VERSION, **state}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise VitkitError(f"no training checkpoint at '{p}' (nothing to resume)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, ...
        raise VitkitError(f"'{p}' is not a readable vitkit checkpoint ({upstream_reason(e)})") from e
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise VitkitError(f"'{p}' is not a vitkit checkpoint of version {CHECKPOINT_VERSION}")
    return state


def check_compatible(
    model_state: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], source: str
) -> None:
    """One clear line when a checkpoint does not fit the model (missing keys, other shapes)."""
    missing = [k for k in model_state if k not in saved]
    unexpected = [k for k in saved if k not in model_state]
    if missing or unexpected:
        what = f"missing '{missing[0]}'" if missing else f"unexpected '{unexpected[0]}'"
        raise VitkitError(
            f"{source} does not match the model: {what} ({len(missing)} missing, {len(unexpected)} unexpected keys)"
        )
    for k, v in model_state.items():
        if tuple(saved[k].shape) != tuple(v.shape):
            hint = " (different number of classes?)" if k.startswith(("head", "fc.", "classifier")) else ""
            raise VitkitError(
                f"{source} does not match the model: '{k}' has shape {tuple(saved[k].shape)}, the model expects {tuple(v.shape)}{hint}"
            )
