"""LRP-QViT relevance-based mixed precision (gradient×activation relevance) on the trained digits model."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import vitkit
from vitkit.compress.quant import quantize
from vitkit.compress.quant.config import make_config
from vitkit.compress.quant.mixed import average_bits, layer_relevance, mixed_precision_bits
from vitkit.compress.quant.transform import calibration_images
from vitkit.errors import VitkitError
from vitkit.train import evaluate


@pytest.fixture(scope="module")
def float_model(trained_run):
    return vitkit.load(trained_run).eval()


def test_relevance_ranks_a_planted_dead_branch_last_and_gets_the_fewest_bits(float_model, digits):
    planted = copy.deepcopy(float_model)
    with torch.no_grad():  # block 0's MLP branch now adds ~nothing to the residual stream
        planted.blocks[0].mlp.fc2.weight.mul_(1e-3)
        planted.blocks[0].mlp.fc2.bias.mul_(1e-3)
    images = calibration_images(planted, digits.train, make_config())
    rel = layer_relevance(planted, images)
    assert sum(rel.values()) == pytest.approx(1.0)
    assert sorted(rel, key=rel.get)[:2] == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    assert rel["blocks.0.mlp.fc2"] < 0.01 * layer_relevance(float_model, images)["blocks.0.mlp.fc2"]
    bits = mixed_precision_bits(planted, images, 7.0, [4, 8], "lrp")
    assert bits["blocks.0.mlp.fc1"] == bits["blocks.0.mlp.fc2"] == 4
    assert bits["patch_embed.proj"] == bits["head"] == 8  # the most relevant layers keep 8 bits
    assert 6.0 < average_bits(bits, planted) <= 7.0  # budget met, not wasted


def test_lrp_allocation_beats_uniform_at_equal_budget_and_is_recorded(
    float_model, digits, trained_run, tmp_path
):
    q = quantize(copy.deepcopy(float_model), digits.train, method="repq", mixed_precision="lrp", avg_bits=3.0,
                 bit_choices=[2, 8])  # fmt: skip
    cfg = q.vitkit_manifest.transforms[-1].config
    assert cfg["mixed_precision"] == "lrp" and average_bits(cfg["layer_bits"], q) <= 3.0 + 1e-6
    u = quantize(copy.deepcopy(float_model), digits.train, method="repq", mixed_precision="uniform", avg_bits=3.0,
                 bit_choices=[2, 8])  # fmt: skip
    assert evaluate(q, digits.val)["top1"] >= evaluate(u, digits.val)["top1"] + 0.1
    with pytest.raises(VitkitError, match="mixed_precision"):
        make_config(mixed_precision="lrpx", avg_bits=4.5)


@pytest.mark.slow
def test_cli_mixed_precision_lrp_writes_bits_table_and_plot(trained_run, tmp_path, capsys):
    from vitkit.cli import main

    out = tmp_path / "mp"
    code = main(["quantize", str(trained_run), "--mixed-precision", "lrp", "--avg-bits", "4.5", "--method", "repq",
                 "-o", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    info = json.loads((out / "quant.json").read_text())
    assert info["config"]["mixed_precision"] == "lrp" and info["avg_weight_bits"] <= 4.5 + 1e-6
    assert set(info["config"]["layer_bits"].values()) == {4, 8} and (out / "bits.png").stat().st_size > 1000
