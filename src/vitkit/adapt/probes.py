"""Linear and kNN probes on frozen features of any layer: how good a representation is, without
training the encoder.

* Linear probe: features standardised with the training split's statistics (MAE's linear probe puts
  a non-affine BatchNorm before the head: the same thing at evaluation time), then a multinomial
  logistic regression (scikit-learn, L-BFGS, L2 strength ``C``). MAE trains its probe with LARS for
  90 epochs; a convex solver reaches the optimum of the same model directly (our simplification).
* kNN probe: the weighted k-nearest-neighbour classifier of DINO (Caron et al., 2021) and InstDisc:
  L2-normalised features, the k most cosine-similar training features vote with weight
  ``exp(sim / T)`` (k = 20, T = 0.07).

Features (``layer=None``): the model's own pooled pre-logits features
(``forward_head(forward_features(x), pre_logits=True)``: what its head sees). ``layer=k``: the
tokens after block k from timm's ``forward_intermediates`` (prefix tokens, including VPT prompts,
split off by timm), averaged over patches (``pool="avg"``) or the class token (``pool="cls"``).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from vitkit.data import DataSplits, ImageDataset, load_splits
from vitkit.errors import VitkitError
from vitkit.io import write_json
from vitkit.registry import parse_config
from vitkit.train.evaluate import eval_transform


class ProbeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["linear", "knn"] = "linear"
    layer: int | None = Field(None, description="block index (negative from the end); None = pooled features")
    pool: Literal["avg", "cls"] = Field("avg", description="token pooling for layer=k")
    C: float = Field(1.0, gt=0, description="linear: inverse L2 strength")
    max_iter: int = Field(2000, gt=0)
    k: int = Field(20, gt=0, description="knn: neighbours")
    temperature: float = Field(0.07, gt=0, description="knn: vote weight exp(sim / T)")
    batch_size: int = Field(256, gt=0)


@dataclass
class ProbeResult:
    method: str
    layer: int | None
    top1: float
    balanced_accuracy: float
    feature_dim: int
    train_size: int
    eval_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    data: ImageDataset,
    *,
    layer: int | None = None,
    pool: str = "avg",
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """(N, D) float32 features of every image of ``data`` (see the module docstring)."""
    if layer is not None and not hasattr(model, "forward_intermediates"):
        raise VitkitError(
            f"probe --layer needs timm's forward_intermediates; {type(model).__name__} has none"
        )
    if layer is None and not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise VitkitError(
            f"probe needs timm's forward_features/forward_head; {type(model).__name__} lacks them"
        )
    if layer is not None:
        depth = len(model.blocks)
        if not -depth <= layer < depth:
            raise VitkitError(f"probe layer {layer} does not exist (the model has {depth} blocks)")
        if pool == "cls" and not getattr(
            model, "has_class_token", getattr(model, "cls_token", None) is not None
        ):
            raise VitkitError("probe pool 'cls' needs a class token; this model has none (use pool avg)")
    tf = eval_transform(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(data), batch_size):
            x = tf.images(data.images[i : i + batch_size]).to(device)
            if layer is None:
                f = model.forward_head(model.forward_features(x), pre_logits=True)
            else:
                idx = layer % len(model.blocks)
                (tokens, prefix), *_ = model.forward_intermediates(
                    x, indices=[idx], output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
                )
                f = prefix[:, 0] if pool == "cls" else tokens.mean(dim=1)
            out.append(f.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def _check_single_label(data: ImageDataset) -> None:
    if data.multilabel:
        raise VitkitError(f"{data.name}: probes need single-label data (got multi-label targets)")


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(y, pred))


def linear_probe_features(
    train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor, cfg: ProbeConfig
) -> np.ndarray:
    """Predicted classes for ``eval_x`` from a logistic regression fit on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    # One BLAS thread: the problem is small, and spinning BLAS threads on a shared 2-core machine
    # were measured 10x slower than one.
    with threadpool_limits(1):
        scaler = StandardScaler().fit(train_x.numpy())
        clf = LogisticRegression(C=cfg.C, max_iter=cfg.max_iter)
        clf.fit(scaler.transform(train_x.numpy()), train_y.numpy())
        return clf.predict(scaler.transform(eval_x.numpy()))


def knn_probe_features(
    train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor, cfg: ProbeConfig, num_classes: int
) -> np.ndarray:
    """DINO's weighted kNN: cosine similarity, top-k neighbours vote with exp(sim / T)."""
    tr = torch.nn.functional.normalize(train_x, dim=1)
    ev = torch.nn.functional.normalize(eval_x, dim=1)
    k = min(cfg.k, len(tr))
    preds = []
    for i in range(0, len(ev), 1024):
        sim = ev[i : i + 1024] @ tr.T
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(top), num_classes)
        votes.scatter_add_(1, train_y[idx], (top / cfg.temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds).numpy()


def measure_probe(
    model: nn.Module,
    data: DataSplits,
    cfg: ProbeConfig | dict[str, Any] | None = None,
    *,
    device: str | torch.device = "cpu",
) -> ProbeResult:
    """Fit the probe on ``data.train``'s frozen features; score it on ``data.val``."""
    cfg = parse_config(ProbeConfig, cfg, "probe")
    _check_single_label(data.train)
    kw = dict(layer=cfg.layer, pool=cfg.pool, batch_size=cfg.batch_size, device=device)
    train_x = extract_features(model, data.train, **kw)
    eval_x = extract_features(model, data.val, **kw)
    train_y, eval_y = data.train.targets.long(), data.val.targets.long()
    if cfg.method == "linear":
        pred = linear_probe_features(train_x, train_y, eval_x, cfg)
    else:
        pred = knn_probe_features(train_x, train_y, eval_x, cfg, data.train.num_classes)
    y = eval_y.numpy()
    return ProbeResult(
        method=cfg.method,
        layer=cfg.layer,
        top1=float((pred == y).mean()),
        balanced_accuracy=_balanced_accuracy(y, pred),
        feature_dim=int(train_x.shape[1]),
        train_size=len(train_x),
        eval_size=len(eval_x),
    )


def probe_data_for_run(run_dir: str | os.PathLike, data: str | None, img_size: int) -> DataSplits:
    """The run's own train/val split (from its config.yaml) or ``data``'s split."""
    from vitkit.train import build_config as build_train_config

    cfg_path = Path(run_dir) / "config.yaml"
    if data is None and not cfg_path.is_file():
        raise VitkitError(f"run '{run_dir}' has no config.yaml: say which data to probe on with --data")
    if cfg_path.is_file():
        tc = build_train_config(cfg_path)
        if data is None or data == tc.data:
            return load_splits(
                tc.data,
                val_fraction=tc.val_fraction,
                seed=tc.split_seed,
                train_size=tc.train_size,
                val_size=tc.val_size,
                img_size=img_size if tc.data.startswith(("folder:", "csv:", "coco:")) else None,
            )
    assert data is not None
    return load_splits(data, img_size=img_size if data.startswith(("folder:", "csv:", "coco:")) else None)


def probe_run(
    run_dir: str | os.PathLike,
    cfg: ProbeConfig | dict[str, Any] | None = None,
    *,
    data: str | None = None,
    output: str | os.PathLike | None = None,
    device: str = "cpu",
) -> tuple[ProbeResult, Path]:
    """Probe a run's frozen features; writes ``metrics.json`` to ``output``
    (default ``RUN/probe-<method>[-layer<k>]``)."""
    from vitkit.models import model_input_size
    from vitkit.runs import load

    cfg = parse_config(ProbeConfig, cfg, "probe")
    model = load(run_dir, device=device)
    splits = probe_data_for_run(run_dir, data, model_input_size(model)[1])
    result = measure_probe(model, splits, cfg, device=device)
    tag = f"probe-{cfg.method}" + ("" if cfg.layer is None else f"-layer{cfg.layer}")
    if data:
        tag += "-" + re.sub(r"[^A-Za-z0-9._-]+", "_", data).strip("_")[:40]
    out = Path(output) if output else Path(run_dir) / tag
    write_json(out / "metrics.json", {**result.to_dict(), "run": str(run_dir), "config": cfg.model_dump()})
    return result, out
