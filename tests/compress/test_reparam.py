"""RePaViT: exact reparameterization (float64), smaller FFN, reload of both forms, a trained model."""

from __future__ import annotations

import copy

import pytest
import torch

from vitkit.compress.reparam import (
    ChannelIdleMlp,
    ReparamMlp,
    apply_repavit,
    ffn_macs_per_token,
    reparameterize,
)
from vitkit.errors import VitkitError
from vitkit.models import create_model
from vitkit.runs import load, save_model


def _repavit(idle=0.75, seed=0, **kw):
    torch.manual_seed(seed)
    m = create_model("vitkit_micro_p4_16", **kw)
    apply_repavit(m, {"idle": idle})
    m.train()
    with torch.no_grad():  # BatchNorm statistics and affine parameters away from their defaults
        for _ in range(2):
            m(torch.randn(8, 3, 16, 16))
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm1d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.5)
    return m.eval()


@pytest.mark.parametrize("idle,kw", [(0.75, {}), (0.5, {"init_values": 0.3}), (1.0, {}), (0.0, {})])
def test_reparameterization_is_exact_in_float64(idle, kw):
    m = _repavit(idle, **kw).double()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        ref = m(x)
        r = reparameterize(copy.deepcopy(m))
        got = r(x)
    assert (got - ref).abs().max().item() < 1e-12
    assert all(isinstance(b.mlp, ReparamMlp) for b in r.blocks)
    if idle == 1.0:  # no active channel: the FFN collapses into one linear
        assert all(b.mlp.fc1 is None for b in r.blocks)


def test_float32_and_parameter_count():
    m = _repavit(0.75)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = m(x)
        r = reparameterize(copy.deepcopy(m))
        torch.testing.assert_close(r(x), ref, rtol=1e-5, atol=1e-5)
    C, H = 64, 256
    ffn = sum(p.numel() for p in r.blocks[0].mlp.parameters())
    assert ffn == C * C + C + (C * 64 + 64) + 64 * C  # lin + active fc1 (a = 64) + active fc2
    assert ffn_macs_per_token(C, H, 0.75) == (2 * H * C, C * C + 2 * 64 * C)  # 8C² -> 3C²


def test_both_forms_reload_from_the_manifest(tmp_path):
    m = _repavit(0.75)
    x = torch.randn(2, 3, 16, 16)
    save_model(tmp_path / "train", m, classes=[str(i) for i in range(10)])
    back = load(tmp_path / "train")
    assert isinstance(back.blocks[0].mlp, ChannelIdleMlp)
    with torch.no_grad():
        assert torch.equal(back(x), m(x))
    r = reparameterize(back)
    save_model(tmp_path / "infer", r, classes=[str(i) for i in range(10)])
    back2 = load(tmp_path / "infer")
    assert [t.name for t in back2.vitkit_manifest.transforms] == ["repavit", "repavit_reparam"]
    with torch.no_grad():
        assert torch.equal(back2(x), r(x))


def test_bad_inputs():
    torch.manual_seed(0)
    m = create_model("vitkit_micro_p4_16")
    for idle in (-0.1, 1.5):
        with pytest.raises(VitkitError, match=r"θ must be in \[0, 1\]"):
            apply_repavit(copy.deepcopy(m), {"idle": idle})
    with pytest.raises(VitkitError, match="no RePaViT channel-idle FFN"):
        reparameterize(copy.deepcopy(m))
    r = reparameterize(_repavit())
    with pytest.raises(VitkitError, match="already reparameterized"):
        reparameterize(r)


@pytest.mark.slow
def test_trained_repavit_model_keeps_its_accuracy_after_reparam(tmp_path, quick, digits):
    from vitkit.stages.compress import reparam_run
    from vitkit.stages.train import train_model
    from vitkit.train import evaluate

    cfg = quick(model="vitkit_micro_p4_16", epochs=8, lr=2e-3, warmup_epochs=1)
    run = train_model(
        cfg.model_copy(update={"transforms": ["repavit:idle=0.75"]}), tmp_path / "repa", quiet=True
    )
    assert run.metrics["top1"] > 0.75, run.metrics["top1"]
    res = reparam_run(tmp_path / "repa", tmp_path / "repa-inf")
    assert res.metrics["top1"] == pytest.approx(run.metrics["top1"], abs=1 / 359)
    assert res.metrics["parameters"] < res.metrics["parameters_before"]
    a, b = load(tmp_path / "repa"), load(tmp_path / "repa-inf")
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-4)
    assert evaluate(b, digits.val)["top1"] == pytest.approx(res.metrics["top1"])


def test_a_transformed_run_fine_tunes_without_applying_its_transforms_again(tmp_path, quick):
    """A run trained with --transform carries it in its model; a compression stage's fine-tuning must
    not apply the config's transforms on top (RePaViT twice would nest its FFNs)."""
    from vitkit.runs import Run
    from vitkit.stages.compress import reduce_tokens_run
    from vitkit.stages.train import train_model

    cfg = quick(epochs=1).model_copy(update={"transforms": ["repavit:idle=0.75"]})
    run = train_model(cfg, tmp_path / "repa", quiet=True)
    reduced = reduce_tokens_run(run.path, tmp_path / "tome", method="tome", r=2, finetune=1)
    assert Run.open(reduced.path).transforms == ["repavit", "tome"]
