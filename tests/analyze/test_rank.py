"""As-ViT complexity proxy: exact on closed-form networks, properties on ViTs, ranking with short
training (Kendall-τ), the CLI and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from vitkit.analyze.rank import (
    ArchSpec,
    config_grid,
    kendall_tau,
    measure_complexity,
    ntk_condition_number,
    rank_configs,
)
from vitkit.errors import VitkitError
from vitkit.models import create_model


class _Linear(nn.Module):
    """f(x) = scale * flatten(x): the image of the input circle is a circle of radius scale * r."""

    def __init__(self, scale: float):
        super().__init__()
        self.pretrained_cfg = {"input_size": (1, 3, 3)}
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward_features(self, x):
        return self.scale * x.flatten(1)


@pytest.mark.parametrize(("scale", "radius"), [(1.0, 1.0), (3.0, 0.5)])
def test_length_of_the_image_of_a_circle_is_exact(scale, radius):
    res = measure_complexity(_Linear(scale), {"points": 64, "radius": radius})
    assert res.features == 9
    assert res.length == pytest.approx(2 * math.pi * radius * scale, rel=1e-6)


def test_proxy_on_vits_is_deterministic_wider_is_longer_and_the_model_is_untouched():
    torch.manual_seed(0)
    narrow = create_model("vitkit_micro_p4_16", num_classes=10, embed_dim=16)
    torch.manual_seed(0)
    wide = create_model("vitkit_micro_p4_16", num_classes=10, embed_dim=128)
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    a = measure_complexity(wide, {"points": 32})
    b = measure_complexity(wide, {"points": 32})
    assert a.length == b.length > measure_complexity(narrow, {"points": 32}).length
    assert all(torch.equal(before[k], v) for k, v in wide.state_dict().items())
    assert isinstance(wide.norm, nn.LayerNorm)  # the norms were stripped from a copy only
    assert measure_complexity(wide, {"points": 32, "drop_norms": False}).length != a.length


def test_kendall_tau():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40])[0] == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1])[0] == pytest.approx(-1.0)


def test_rank_configs_with_short_training():
    specs = config_grid([1, 2], [16, 32], [2], [4], 16)
    assert [s.name for s in specs] == ["d1-w16-h2-p4", "d1-w32-h2-p4", "d2-w16-h2-p4", "d2-w32-h2-p4"]
    res = rank_configs(specs, {"repeats": 1, "complexity": {"points": 16}, "train_epochs": 2}, progress=False)
    assert len(res.rows) == 4
    scores = [r["complexity"] for r in res.rows]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= r["val_top1"] <= 1.0 for r in res.rows)
    assert max(r["val_top1"] for r in res.rows) > 0.15  # something learned in 2 epochs (chance 0.1)
    assert -1.0 <= res.kendall_tau <= 1.0 and -1.0 <= res.params_kendall_tau <= 1.0
    assert all(r["ntk_cond"] >= 1.0 for r in res.rows)  # the default NTK batch of 16 digits images
    assert -1.0 <= res.ntk_kendall_tau <= 1.0 and -1.0 <= res.combined_kendall_tau <= 1.0


def test_a_cut_short_ranking_resumes_from_its_cache_to_the_same_result(tmp_path):
    specs = config_grid([1, 2], [16], [2], [4], 16)
    cfg = {"repeats": 1, "complexity": {"points": 16}, "train_epochs": 1}
    cache = tmp_path / "rank.json"
    first = rank_configs(specs[:1], cfg, progress=False, cache=cache)  # "cut short" after one candidate
    assert list(json.loads(cache.read_text())["rows"]) == [specs[0].name]
    resumed = rank_configs(specs, cfg, progress=False, cache=cache)
    whole = rank_configs(specs, cfg, progress=False)
    # equal up to float summation order (complexity differs by ~1e-16 between runs in one process)
    assert [r["name"] for r in resumed.rows] == [r["name"] for r in whole.rows]
    for a, b in zip(resumed.rows, whole.rows):
        assert a["val_top1"] == b["val_top1"] and a["complexity"] == pytest.approx(b["complexity"], rel=1e-9)
    assert first.rows[0] in resumed.rows  # read back from the cache, not recomputed
    other = rank_configs(specs[:1], {**cfg, "train_epochs": 2}, progress=False, cache=cache)  # another config
    assert other.rows[0]["val_top1"] != first.rows[0]["val_top1"] or other.config != first.config


def test_config_grid_bad_input():
    with pytest.raises(VitkitError, match="width 30 is not divisible by heads 4"):
        config_grid([1], [30], [4], [4], 16)
    with pytest.raises(VitkitError, match="patch 5 does not divide the image size 16"):
        config_grid([1], [32], [2], [5], 16)
    with pytest.raises(VitkitError, match="depths must be positive"):
        config_grid([0], [32], [2], [4], 16)
    assert ArchSpec(2, 32, 2, 4).kwargs() == dict(depth=2, embed_dim=32, num_heads=2, patch_size=4)


def test_cli_rank_configs_writes_the_ranking(tmp_path):
    from vitkit.cli import main

    out = tmp_path / "rank"
    code = main(
        ["rank-configs", "--depths", "1,2", "--widths", "16", "--heads", "2", "--patches", "4",
         "--repeats", "1", "--points", "16", "-o", str(out)]
    )  # fmt: skip
    assert code == 0
    doc = json.loads((out / "ranking.json").read_text())
    assert [r["name"] for r in doc["rows"]] and doc["kendall_tau"] is None
    assert (out / "ranking.csv").read_text().startswith("name,depth,width,heads,patch")
    assert main(["rank-configs", "--widths", "30", "--heads", "4"]) == 2
    assert main(["rank-configs", "-o", str(out)]) == 2  # refuses a non-empty output directory


def _official_ntk_cond(network, inputs):
    """A transcription of As-ViT's get_ntk_n (lib/procedures/ntk.py) for one network and one batch,
    without CUDA: per-sample backward of the logits with ones, the grads of parameters named
    *weight*, Θ = G Gᵀ, eigh ascending, λ_max / λ_min."""
    network.train()
    network.zero_grad()
    grads_x = []
    logit = network(inputs)
    for _idx in range(len(inputs)):
        logit[_idx : _idx + 1].backward(torch.ones_like(logit[_idx : _idx + 1]), retain_graph=True)
        grad = []
        for name, W in network.named_parameters():
            if "weight" in name and W.grad is not None:
                grad.append(W.grad.view(-1).detach())
        grads_x.append(torch.cat(grad, -1).detach())
        network.zero_grad()
    g = torch.stack(grads_x, 0)
    ntk = torch.einsum("nc,mc->nm", [g, g])
    eigenvalues, _ = torch.linalg.eigh(ntk, UPLO="L")
    return (eigenvalues[-1] / eigenvalues[0]).item()


def test_ntk_condition_number_matches_the_official_procedure():
    import copy

    torch.manual_seed(0)
    model = create_model("vitkit_micro_p4_16", num_classes=10)
    x = torch.randn(16, 3, 16, 16)
    ours = ntk_condition_number(model, x)
    ref = _official_ntk_cond(copy.deepcopy(model), x)
    assert ours == pytest.approx(ref, rel=1e-4)
    assert ours > 1.0
    # the model is left as it was: a copy is differentiated
    assert all(p.grad is None for p in model.parameters())
