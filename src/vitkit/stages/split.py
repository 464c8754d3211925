"""``vitkit split``: ED-ViT — Liu et al., "ED-ViT: Splitting Vision Transformer for Distributed
Inference on Edge Devices" (arXiv 2410.11650, 2024; v2 2025 "Efficient Partitioning Vision
Transformer on Edge Devices for Distributed Inference"). **No public code: this is our reading of
the paper**, step by step:

1. **Splitting by class similarity.** The run's classes are grouped into N subsets (one per device):
   each class's prototype is the mean pre-logits feature of its training images; prototypes are
   clustered with size-balanced k-means (each subset holds ceil(C/N) or floor(C/N) classes), so
   classes a sub-model must tell apart are the similar ones.
2. **Class-wise sub-models.** Sub-model k is the trained ViT with a new head over its subset plus an
   "other" class (every other class maps there: without it a sub-model is over-confident on classes
   it never saw, the trap the notes name), structurally pruned (whole heads and MLP channels,
   vitkit's ``prune_structured``) with first-order Taylor importance measured on the relabelled
   training data, the ratio chosen as the smallest on a grid that fits the device's memory budget
   (fp32 weights), then fine-tuned.
3. **Fusion.** Each sub-model emits its pre-logits feature; the aggregator concatenates them and a
   one-hidden-layer MLP, trained on all classes with the sub-models frozen, gives the C-way
   prediction. "argmax over the concatenated subset logits" is reported beside it (the notes' baseline).

``OUTPUT`` holds ``sub-K`` (plain classification runs: every other stage takes them),
``fusion.safetensors`` and ``split.json`` (partition, sizes, accuracies); ``vitkit serve-split``
runs it distributed (:mod:`vitkit.stages.serve_split`).
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.data import DataSplits, ImageDataset
from vitkit.errors import VitkitError
from vitkit.io import write_json
from vitkit.models import count_parameters, get_manifest
from vitkit.progress import console
from vitkit.runs import Run, check_run_dir

PRUNE_GRID = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
FUSION_FILE = "fusion.safetensors"
SPLIT_JSON = "split.json"


class Fusion(nn.Module):
    """The aggregator: concatenated sub-model features -> hidden -> the C classes."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, num_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


@torch.no_grad()
def features(model: nn.Module, data: ImageDataset, batch_size: int = 256) -> torch.Tensor:
    """Pre-logits features (timm ``forward_head(..., pre_logits=True)``) of every image, in order."""
    from vitkit.models.inference import predict

    return predict(
        model,
        data,
        batch_size=batch_size,
        forward=lambda m, x: m.forward_head(m.forward_features(x), pre_logits=True),
    )


def partition_classes(
    prototypes: torch.Tensor, groups: int, seed: int = 0, iters: int = 50
) -> list[list[int]]:
    """Size-balanced k-means of the class prototypes (cosine): ``groups`` lists of class indices, sizes
    differing by at most one. Assignment each round: classes in order of their best similarity take
    the most similar centre with room left."""
    c = len(prototypes)
    if not 2 <= groups <= c:
        raise VitkitError(f"--devices {groups}: expected 2 to the number of classes ({c})")
    z = F.normalize(prototypes.double(), dim=1)
    g = torch.Generator().manual_seed(seed)
    centres = z[torch.randperm(c, generator=g)[:groups]].clone()
    caps = [c // groups + (1 if k < c % groups else 0) for k in range(groups)]
    assign = [-1] * c
    for _ in range(iters):
        sim = z @ centres.T
        order = sim.max(1).values.argsort(descending=True).tolist()
        room = list(caps)
        new = [-1] * c
        for i in order:
            for k in sim[i].argsort(descending=True).tolist():
                if room[k]:
                    new[i], room[k] = k, room[k] - 1
                    break
        if new == assign:
            break
        assign = new
        for k in range(groups):
            members = [i for i in range(c) if assign[i] == k]
            centres[k] = F.normalize(z[members].mean(0), dim=0)
    return [[i for i in range(c) if assign[i] == k] for k in range(groups)]


def relabel(data: ImageDataset, subset: list[int], classes: list[str]) -> ImageDataset:
    """Targets mapped to the subset's classes, every other class to "other" (the last index)."""
    mapping = torch.full((len(classes),), len(subset), dtype=torch.long)
    for j, c in enumerate(subset):
        mapping[c] = j
    names = [classes[c] for c in subset] + ["other"]
    return ImageDataset(data.images, mapping[data.targets], names, data.name, dict(data.info))


def weight_mb(model: nn.Module) -> float:
    return count_parameters(model) * 4 / 2**20


def _pruned(model: nn.Module, ratio: float, data: ImageDataset) -> nn.Module:
    from vitkit.compress.prune import apply_structured_prune

    if ratio == 0:
        return model
    return apply_structured_prune(model, {"heads": ratio, "mlp": ratio, "importance": "taylor"}, data)


def fit_budget(model: nn.Module, data: ImageDataset, memory_mb: float | None, ratio: float | None):
    """(pruned model, ratio): ``ratio`` if given, else the smallest grid ratio whose fp32 weights fit."""
    if ratio is not None:
        return _pruned(copy.deepcopy(model), ratio, data), ratio
    if memory_mb is None:
        return model, 0.0
    for r in PRUNE_GRID:
        try:
            cand = _pruned(copy.deepcopy(model), r, data)
        except VitkitError:
            break  # a block would lose all its heads: no larger ratio fits either
        if weight_mb(cand) <= memory_mb:
            return cand, r
    raise VitkitError(
        f"--memory-mb {memory_mb:g}: no sub-model fits (the embeddings and head alone take more; "
        f"the smallest reachable is {weight_mb(_pruned(copy.deepcopy(model), PRUNE_GRID[-2], data)):.2f} MB)"
    )


def train_fusion(
    feats: torch.Tensor, targets: torch.Tensor, num_classes: int, epochs: int, seed: int, hidden: int = 128
) -> Fusion:
    torch.manual_seed(seed)
    fusion = Fusion(feats.shape[1], num_classes, hidden)
    mean, std = feats.mean(0), feats.std(0).clamp(min=1e-6)
    fusion.register_buffer("mean", mean)
    fusion.register_buffer("std", std)
    opt = torch.optim.AdamW(fusion.parameters(), lr=3e-3, weight_decay=1e-4)
    x = (feats - mean) / std
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(128):
            loss = F.cross_entropy(fusion.net(x[idx]), targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    fusion.eval()
    return fusion


def fuse(fusion: Fusion, feats: torch.Tensor) -> torch.Tensor:
    return fusion.net((feats - fusion.mean) / fusion.std)


def split_run(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    devices: int,
    memory_mb: float | None = None,
    prune: float | None = None,
    epochs: int = 2,
    fusion_epochs: int = 20,
    lr: float | None = None,
    seed: int = 0,
    force: bool = False,
    quiet: bool = True,
) -> dict[str, Any]:
    """Split the classification run ``source`` into ``devices`` sub-models + a fusion head (module
    docstring); returns the report written to ``OUTPUT/split.json``."""
    from safetensors.torch import save_file

    from vitkit.io import atomic_path
    from vitkit.stages.train import train_model

    check_run_dir(output, force=force)
    if prune is not None and not 0 <= prune < 1:
        raise VitkitError(f"--prune {prune}: expected a fraction in [0, 1)")
    run = Run.open(source)
    if run.info.task not in ("classification", "multiclass"):
        raise VitkitError(f"split: '{source}' is a {run.info.task} run; ED-ViT splits a classifier")
    model = run.model()
    splits = run.splits()
    train, val = splits.train, splits.val
    classes = list(run.classes)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    ftrain = features(model, train)
    protos = torch.stack([ftrain[train.targets == c].mean(0) for c in range(len(classes))])
    groups = partition_classes(protos, devices, seed)
    cfg = dict(run.config.model_dump()) if run.config is not None else {}
    subs, report_subs = [], []
    for k, subset in enumerate(groups):
        sub_train, sub_val = relabel(train, subset, classes), relabel(val, subset, classes)
        sub = copy.deepcopy(model)
        sub.reset_classifier(len(subset) + 1)
        get_manifest(sub).kwargs["num_classes"] = len(subset) + 1
        sub, ratio = fit_budget(sub, sub_train, memory_mb, prune)
        tcfg = {
            **cfg,
            "epochs": epochs,
            "warmup_epochs": 0,
            "seed": seed + k,
            "tensorboard": False,
            "transforms": [],
        }
        tcfg = {key: v for key, v in tcfg.items() if v is not None}
        if lr is not None:
            tcfg["lr"] = lr
        trained = train_model(
            tcfg,
            out / f"sub-{k}",
            model=sub,
            data=DataSplits(sub_train, sub_val, None, splits.description),
            quiet=quiet,
            force=True,
        )
        subs.append(trained.model.eval())
        report_subs.append({
            "classes": [classes[c] for c in subset],
            "prune": ratio,
            "parameters": count_parameters(trained.model),
            "weight_mb": round(weight_mb(trained.model), 4),
            "top1_on_its_labels": trained.metrics.get("top1"),
        })  # fmt: skip
        if not quiet:
            console.print(
                f"split: sub-model {k}: {len(subset)} classes + other, prune {ratio:g}, {weight_mb(trained.model):.2f} MB"
            )
    # fusion over the frozen sub-models' features, trained on every class
    f_train = torch.cat([features(s, train) for s in subs], 1)
    f_val = torch.cat([features(s, val) for s in subs], 1)
    fusion = train_fusion(f_train, train.targets, len(classes), fusion_epochs, seed)
    with torch.no_grad():
        fused_top1 = float((fuse(fusion, f_val).argmax(1) == val.targets).double().mean())
        concat = torch.full((len(val), len(classes)), -math.inf)
        from vitkit.models.inference import predict

        for s, subset in zip(subs, groups):
            logits = predict(s, val)[:, : len(subset)]  # its own classes (not "other")
            for j, c in enumerate(subset):
                concat[:, c] = torch.maximum(concat[:, c], logits[:, j])
        argmax_top1 = float((concat.argmax(1) == val.targets).double().mean())
    with atomic_path(out / FUSION_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in fusion.state_dict().items()}, str(tmp))
    report = {
        "source": str(source),
        "devices": devices,
        "memory_mb": memory_mb,
        "classes": classes,
        "groups": groups,
        "sub_models": report_subs,
        "fusion": {
            "in_features": f_train.shape[1],
            "hidden": fusion.net[0].out_features,
            "epochs": fusion_epochs,
        },
        "fused_top1": fused_top1,
        "concat_argmax_top1": argmax_top1,
        "source_top1": run.metrics.get("top1"),
        "source_parameters": count_parameters(model),
        "source_weight_mb": round(weight_mb(model), 4),
        "max_sub_weight_mb": max(s["weight_mb"] for s in report_subs),
    }
    write_json(out / SPLIT_JSON, report)
    return report


def load_split(path: str | os.PathLike) -> tuple[dict[str, Any], list[nn.Module], Fusion]:
    """The split bundle: its report, the sub-models (eval mode) and the fusion head."""
    import json

    from safetensors.torch import load_file

    import vitkit

    p = Path(path)
    if not (p / SPLIT_JSON).is_file():
        raise VitkitError(f"'{p}' is not a vitkit split (no {SPLIT_JSON}; make one with vitkit split)")
    report = json.loads((p / SPLIT_JSON).read_text())
    subs = [vitkit.load(p / f"sub-{k}").eval() for k in range(report["devices"])]
    f = report["fusion"]
    fusion = Fusion(f["in_features"], len(report["classes"]), f["hidden"])
    state = load_file(str(p / FUSION_FILE))
    fusion.register_buffer("mean", state["mean"])
    fusion.register_buffer("std", state["std"])
    fusion.load_state_dict(state)
    return report, subs, fusion.eval()
