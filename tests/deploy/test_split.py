"""ED-ViT: classes split by similarity into balanced subsets, class-wise pruned sub-models that fit a
memory budget, a fusion head over their features, served for real by one process per sub-model."""

from __future__ import annotations

import json

import pytest
import torch

from vitkit.errors import VitkitError
from vitkit.stages.split import load_split, partition_classes, relabel, split_run, weight_mb


def test_partition_is_balanced_and_groups_similar_classes():
    torch.manual_seed(0)
    a, b = torch.randn(64), torch.randn(64)
    protos = torch.stack(
        [a + 0.1 * torch.randn(64) for _ in range(3)] + [b + 0.1 * torch.randn(64) for _ in range(3)]
    )
    groups = partition_classes(protos, 2)
    assert sorted(map(sorted, groups)) == [[0, 1, 2], [3, 4, 5]]
    sizes = sorted(len(g) for g in partition_classes(torch.randn(10, 8), 3))
    assert sizes == [3, 3, 4]
    assert sorted(c for g in partition_classes(torch.randn(10, 8), 3) for c in g) == list(range(10))
    with pytest.raises(VitkitError, match="--devices 11"):
        partition_classes(torch.randn(10, 8), 11)


def test_relabel_maps_other_classes_to_other():
    from vitkit.data import ImageDataset

    data = ImageDataset(
        torch.zeros(5, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1, 2, 3, 4]), list("abcde")
    )
    sub = relabel(data, [3, 1], list("abcde"))
    assert sub.classes == ["d", "b", "other"] and sub.targets.tolist() == [2, 1, 2, 0, 2]


@pytest.fixture(scope="module")
def split(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("split") / "s"
    return out, split_run(trained_run, out, devices=2, memory_mb=0.5, epochs=1, fusion_epochs=15)


def test_split_fits_the_budget_and_fusion_beats_argmax(split, trained_run):
    out, r = split
    assert len(r["groups"]) == 2 and sorted(c for g in r["groups"] for c in g) == list(range(10))
    assert all(s["weight_mb"] <= 0.5 for s in r["sub_models"]) and r["source_weight_mb"] > 0.5
    assert all(s["prune"] > 0 for s in r["sub_models"])  # the budget forced pruning
    assert r["fused_top1"] > r["concat_argmax_top1"]  # the fusion head beats argmax over subset logits
    assert r["fused_top1"] > r["source_top1"] - 0.15  # 1 fine-tuning epoch after pruning half the model
    report, subs, _ = load_split(out)
    assert len(subs) == 2 and report == json.loads((out / "split.json").read_text())
    assert weight_mb(subs[0]) == pytest.approx(r["sub_models"][0]["weight_mb"], abs=1e-3)


def test_split_bad_input(trained_run, tmp_path, split):
    with pytest.raises(VitkitError, match="no sub-model fits"):
        split_run(trained_run, tmp_path / "x", devices=2, memory_mb=0.01, epochs=1)
    with pytest.raises(VitkitError, match=r"--prune 1\.5"):
        split_run(trained_run, tmp_path / "y", devices=2, prune=1.5)
    from vitkit.stages.serve_split import serve_split

    with pytest.raises(VitkitError, match="not a vitkit split"):
        serve_split(tmp_path)
    with pytest.raises(VitkitError, match=r"--procs 3: the split has 2 sub-models"):
        serve_split(split[0], procs=3)


@pytest.mark.slow
def test_serve_split_runs_one_process_per_sub_model(split):
    from vitkit.stages.serve_split import serve_split

    out, r = split
    doc = serve_split(out, requests=10, batch=32)
    assert doc["processes"] == 2 and len(doc["peak_rss_mb"]) == 2
    assert doc["served_top1"] == pytest.approx(
        r["fused_top1"], abs=1e-9
    )  # the distributed path is the same model
    assert doc["latency_ms"]["split_p50"] > 0 and doc["throughput"]["unsplit"] > 0
