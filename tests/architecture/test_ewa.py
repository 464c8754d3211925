"""Experts weights averaging: random uniform partition, the EWA rule, exact conversion back to one FFN,
the wiring into the one loop, training on real data and bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vitkit.architecture.ewa import EWAAveraging, EWAMoE, apply_ewa, ewa_layers, merge_ewa
from vitkit.errors import VitkitError
from vitkit.models import count_parameters, create_model
from vitkit.train import fit


def _perturb(model, scale=0.1):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in ewa_layers(model):
            for e in layer.experts:
                for p in e.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * scale)


def test_conversion_is_exact_and_restores_the_parameter_count():
    torch.manual_seed(0)
    model = create_model("vitkit_micro_p4_16", num_classes=10)
    baseline = count_parameters(model)
    apply_ewa(model, {"experts": 4})
    assert [i for i, b in enumerate(model.blocks) if isinstance(b.mlp, EWAMoE)] == [1, 3]
    assert count_parameters(model) == baseline + 2 * 3 * sum(
        p.numel() for p in model.blocks[0].mlp.parameters()
    )
    _perturb(model)  # experts now differ
    layer = ewa_layers(model)[0]
    mean_fc1 = torch.stack([e.fc1.weight for e in layer.experts]).mean(0)
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    moe_out = model(x)
    merge_ewa(model)
    assert count_parameters(model) == baseline
    assert not ewa_layers(model)
    torch.testing.assert_close(model.blocks[1].mlp.fc1.weight, mean_fc1)
    torch.testing.assert_close(model(x), moe_out, atol=1e-6, rtol=1e-6)


def test_partition_covers_every_token_once_in_equal_groups():
    layer = EWAMoE(torch.nn.Identity(), experts=4, share=0.3)
    groups = layer.partition(8, 17, torch.device("cpu"))
    for row in groups:
        counts = torch.bincount(row, minlength=4)
        assert counts.sum() == 17 and counts.max() - counts.min() <= 1
    # different samples get different partitions
    assert not all(torch.equal(groups[0], r) for r in groups[1:])


def test_identical_experts_compute_the_ffn_in_training():
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(0)
    ref = create_model("vitkit_micro_p4_16", num_classes=10).train()
    torch.manual_seed(0)
    moe = apply_ewa(create_model("vitkit_micro_p4_16", num_classes=10), {"experts": 3, "every": 1}).train()
    # same init (the experts are copies of the FFN): any partition gives the plain FFN's output
    torch.testing.assert_close(moe(x), ref(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("experts", [2, 4])
def test_ewa_rule_keeps_the_mean_and_matches_the_formula(experts):
    torch.manual_seed(0)
    layer = EWAMoE(torch.nn.Linear(5, 3), experts=experts, share=0.3)
    with torch.no_grad():
        for e in layer.experts:
            e.weight.normal_()
    before = torch.stack([e.weight.detach().clone() for e in layer.experts])
    layer.average_()
    after = torch.stack([e.weight.detach() for e in layer.experts])
    total = before.sum(0)
    want = 0.7 * before + 0.3 / (experts - 1) * (total - before)
    torch.testing.assert_close(after, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(after.mean(0), before.mean(0), atol=1e-6, rtol=1e-6)
    # experts move towards each other: the spread shrinks by 1 - share * N / (N - 1)
    shrink = 1 - 0.3 * experts / (experts - 1)
    torch.testing.assert_close(
        after - after.mean(0), shrink * (before - before.mean(0)), atol=1e-6, rtol=1e-5
    )


def test_one_expert_is_the_ffn():
    ffn = torch.nn.Linear(4, 4)
    layer = EWAMoE(ffn, experts=1, share=0.5).train()
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(layer(x), ffn(x))


@pytest.mark.parametrize(("share", "identical"), [(0.5, True), (0.0, False)])
def test_the_loop_averages_after_every_update(digits, quick, share, identical):
    # two experts and share 0.5: each EWA step makes them equal; share 0: random partitions make
    # them drift apart. Only the loop's after_optimizer_step wiring can tell the two apart.
    data = dataclasses.replace(digits, train=digits.train.subset(torch.arange(192)))
    torch.manual_seed(0)
    model = apply_ewa(create_model("vitkit_nano_p4_16", num_classes=10), {"experts": 2, "share": share})
    fit(model, data, quick(epochs=1), callbacks=[EWAAveraging()], quiet=True)
    e0, e1 = ewa_layers(model)[0].experts
    same = torch.allclose(e0.fc1.weight, e1.fc1.weight, atol=1e-6)
    assert same is identical


def test_ewa_trains_on_digits_and_saves_a_dense_vit(tmp_path, quick):
    from vitkit.api import train_model
    from vitkit.runs import load

    cfg = quick(model="vitkit_nano_p4_16", epochs=6, transforms=["ewa:experts=4,share=0.3"])
    run = train_model(cfg, tmp_path / "ewa", quiet=True)
    assert run.metrics["top1"] > 0.45  # chance is 0.1; the plain nano ViT reaches ~0.55 here
    assert run.metrics["parameters"] == 19626  # the plain nano ViT's count: same inference cost
    back = load(run.path)
    assert [t.name for t in back.vitkit_manifest.transforms] == ["ewa", "ewa_merge"]
    assert not ewa_layers(back)
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(back(x), run.model.eval()(x))


def test_ewa_bad_input():
    m = create_model("vitkit_nano_p4_16", num_classes=10)
    for share in (-0.1, 1.5):
        with pytest.raises(VitkitError, match=r"ewa: option 'share': the share rate must be in \[0, 1\]"):
            apply_ewa(m, {"share": share})
    with pytest.raises(VitkitError, match="out of range"):
        apply_ewa(m, {"layers": [5]})
    with pytest.raises(VitkitError, match="no timm Mlp"):
        apply_ewa(create_model("vitkit_dhvt_nano_p4_16", num_classes=10))
    with pytest.raises(VitkitError, match="no EWA mixture-of-experts layers to merge"):
        merge_ewa(m)


def test_cli_share_rate_outside_unit_interval_exits_2(tmp_path, capsys):
    from vitkit.cli import main

    code = main(["train", "--transform", "ewa:share=1.5", "-o", str(tmp_path / "r"), "--epochs", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "share rate must be in [0, 1]" in err and "\n" not in err.strip()
    assert not (tmp_path / "r").exists()


def test_ewa_run_resumes_with_its_experts_and_merges_at_the_end(tmp_path, quick):
    from vitkit.api import resume_config, train_model
    from vitkit.train import TrainingInterrupted

    out = tmp_path / "r"
    cfg = quick(model="vitkit_nano_p4_16", epochs=2, train_size=256, transforms=["ewa:experts=2"])
    with pytest.raises(TrainingInterrupted):
        train_model(cfg, out, quiet=True, stop_after_epoch=1)
    # the checkpoint holds the MoE state: the resumed run rebuilds the experts from config.yaml
    run = train_model(resume_config(out), out, resume=True, quiet=True)
    assert run.metrics["parameters"] == 19626 and not ewa_layers(run.model)
    assert len(run.history) == 2
