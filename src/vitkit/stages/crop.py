"""``vitkit crop``: the crop stage of a detect -> crop -> classify pipeline (issue 20 part 4, after
"YOLOv8 + DeiT" brain-tumour pipelines): cut the boxes of a detection run's data, true or detected,
into an ``npz:`` dataset a classifier trains on or is evaluated on.

- ``boxes="truth"``: every true box (what a classifier trains on); label = its class.
- ``boxes="detected"``: the detection run's boxes scoring at least ``min_score`` (what the pipeline
  classifies), after a class-agnostic NMS at IoU 0.5 (the detector's NMS is per class, and the
  classifier decides the class: one crop per object); label = the class of the true box it
  overlaps best (IoU >= 0.5). A detection that
  matches no true box is not written (the summary counts it: ``unmatched``); a true box no
  detection found is counted as ``missed``.

Each crop is the box grown by ``margin`` (a fraction of its side, each way), sampled to ``size`` x
``size`` by torchvision's ``roi_align`` (bilinear, ``aligned=True``). The npz holds ``x`` (N, C, S, S)
uint8, ``y`` labels, ``classes``, ``groups`` (the source's group ids, e.g. a patient per image, when
the data has them; else the source image's index), ``scores`` (the detector's; 1 for true boxes)
and ``image_index``. A classifier evaluated on it reports group-level metrics too
(``vitkit.tasks.classification``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitkit.errors import VitkitError
from vitkit.io import atomic_path, check_output
from vitkit.runs import Run
from vitkit.stages.common import run_task

MATCH_IOU = 0.5
CROP_NMS_IOU = 0.5


def crop_boxes(
    run_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    data: str | None = None,
    split: str = "val",
    boxes: str = "detected",
    min_score: float = 0.3,
    size: int | None = None,
    margin: float = 0.1,
    force: bool = False,
) -> dict[str, Any]:
    """Write the crops of ``run_dir``'s data (its ``split``, or the whole of ``data``) to ``output``
    (.npz); returns the summary (crops, matched, unmatched, missed)."""
    from torchvision.ops import box_iou, nms, roi_align

    from vitkit.data.boxes import unpack_boxes

    if boxes not in ("truth", "detected"):
        raise VitkitError(f"--boxes must be 'truth' or 'detected', got '{boxes}'")
    if not 0 <= min_score <= 1:
        raise VitkitError(f"--min-score must be in [0, 1], got {min_score}")
    if not 0 <= margin <= 1:
        raise VitkitError(f"--margin must be in [0, 1], got {margin}")
    if not str(output).endswith(".npz"):
        raise VitkitError(f"-o/--output '{output}': crops are written as an .npz file (name it *.npz)")
    check_output(output, "file", force=force)
    run = Run.open(run_dir)
    task = run_task(run.info)
    if task.name != "detection":
        raise VitkitError(f"run '{run.path}' is a {task.name} run; crop takes a detection run")
    dataset = run.eval_data(data) if data is not None else run.data(split)
    model = run.model()
    c, h, _ = dataset.image_shape
    side = size or h
    truths = unpack_boxes(dataset.targets)
    found = task.predict(model, dataset) if boxes == "detected" else None
    groups = dataset.info.get("groups")
    crops, labels, group_ids, scores, index = [], [], [], [], []
    matched = unmatched = missed = 0
    for i, truth in enumerate(truths):
        if found is None:
            b, lab, sc = truth["boxes"], truth["labels"], torch.ones(len(truth["boxes"]))
        else:
            keep = found[i]["scores"] >= min_score
            b, sc = found[i]["boxes"][keep], found[i]["scores"][keep]
            # class-agnostic: the classifier decides the class, so one crop per object, not per class
            kept = nms(b, sc, CROP_NMS_IOU)
            b, sc = b[kept], sc[kept]
            if len(truth["boxes"]) and len(b):
                iou = box_iou(b, truth["boxes"])
                best, which = iou.max(1)
                ok = best >= MATCH_IOU
                missed += int((iou.max(0).values < MATCH_IOU).sum())
            else:
                ok, which = torch.zeros(len(b), dtype=torch.bool), torch.zeros(len(b), dtype=torch.long)
                missed += len(truth["boxes"])
            unmatched += int((~ok).sum())
            b, sc, lab = b[ok], sc[ok], truth["labels"][which[ok]]
            matched += len(b)
        if len(b) == 0:
            continue
        grow = (b[:, 2:] - b[:, :2]) * margin
        rois = torch.cat([torch.full((len(b), 1), 0.0), b[:, :2] - grow, b[:, 2:] + grow], 1)
        img = dataset.images[i : i + 1].float()
        crops.append(roi_align(img, rois, (side, side), spatial_scale=1.0, sampling_ratio=2, aligned=True))
        labels.append(lab)
        group_ids.append(torch.full((len(b),), int(groups[i]) if groups is not None else i, dtype=torch.long))
        scores.append(sc.float())
        index.append(torch.full((len(b),), i, dtype=torch.long))
    if not crops:
        raise VitkitError(
            f"no crops: {'no detection scored' if boxes == 'detected' else 'the data has no boxes'}"
            + (f" >= {min_score} and matched a true box" if boxes == "detected" else "")
        )
    x = torch.cat(crops).round().clamp(0, 255).to(torch.uint8).numpy()
    arrays = {
        "x": x,
        "y": torch.cat(labels).numpy().astype(np.int64),
        "classes": np.array(list(dataset.classes)),
        "groups": torch.cat(group_ids).numpy(),
        "scores": torch.cat(scores).numpy().astype(np.float32),
        "image_index": torch.cat(index).numpy(),
    }
    with atomic_path(Path(output)) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    summary = {
        "run": str(run.path),
        "data": dataset.name,
        "boxes": boxes,
        "crops": len(x),
        "size": side,
        "channels": c,
        "margin": margin,
        "images": len(dataset),
        "groups": len(np.unique(arrays["groups"])),
    }
    if boxes == "detected":
        summary.update(min_score=min_score, matched=matched, unmatched=unmatched, missed=missed)
    return summary
