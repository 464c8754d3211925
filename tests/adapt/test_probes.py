"""Linear and kNN probes on frozen features: a trained encoder's features separate digits, random
ones much less; any layer; a run's own split; bad inputs."""

from __future__ import annotations

import pytest
import torch

from vitkit.adapt import extract_features, measure_probe, probe_run
from vitkit.errors import VitkitError
from vitkit.models import create_model
from vitkit.runs import load


@pytest.mark.parametrize("method", ["linear", "knn"])
def test_probe_on_trained_features_beats_random_features(trained_run, digits, method):
    trained = measure_probe(load(trained_run), digits, {"method": method})
    torch.manual_seed(0)
    random = measure_probe(create_model("vitkit_micro_p4_16", num_classes=10), digits, {"method": method})
    assert trained.top1 > 0.85 and trained.top1 > random.top1 + 0.1, (trained, random)
    assert trained.feature_dim == 64 and trained.eval_size == len(digits.val)


def test_intermediate_layers_and_pooling(trained_run, digits):
    model = load(trained_run)
    sub = digits.val.subset(range(40))
    f_avg = extract_features(model, sub, layer=-1, pool="avg")
    f_cls = extract_features(model, sub, layer=3, pool="cls")
    assert f_avg.shape == f_cls.shape == (40, 64) and not torch.allclose(f_avg, f_cls)
    early = measure_probe(model, digits, {"layer": 0})
    assert 0.3 < early.top1 <= 1.0


def test_probe_run_uses_the_runs_split_and_writes_metrics(mae_run):
    result, out = probe_run(mae_run, {"method": "knn"})
    assert (out / "metrics.json").is_file() and out.name == "probe-knn"
    assert result.top1 > 0.5 and result.train_size == 1438


def test_bad_probe_inputs(trained_run, digits):
    model = load(trained_run)
    with pytest.raises(VitkitError, match="layer 9"):
        measure_probe(model, digits, {"layer": 9})
    with pytest.raises(VitkitError, match="method"):
        measure_probe(model, digits, {"method": "svm"})
    no_cls = create_model("vitkit_nano_p4_16", num_classes=10, class_token=False, global_pool="avg")
    with pytest.raises(VitkitError, match="class token"):
        extract_features(no_cls, digits.val, layer=0, pool="cls")
