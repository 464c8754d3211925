"""Edge-MoE's approximations: the single-pass softmax is the softmax, the table GELU is within 2e-4 of
GELU, and both swapped into a trained ViT leave its accuracy where it was."""

from __future__ import annotations

import pytest
import torch

from vitkit.compress.approx import TableGELU, apply_edge_approx, gelu_delta_table, single_pass_softmax
from vitkit.errors import VitkitError


def test_single_pass_softmax_is_the_softmax():
    torch.manual_seed(0)
    a = torch.randn(2, 3, 17, 17) * 6
    torch.testing.assert_close(single_pass_softmax(a), a.softmax(-1), rtol=0, atol=1e-6)
    a[..., 5] = 80.0  # a late, large score: the running maximum is re-based mid-stream
    torch.testing.assert_close(single_pass_softmax(a), a.softmax(-1), rtol=0, atol=1e-6)


def test_table_gelu_error():
    table = gelu_delta_table()
    assert table[:3].tolist() == pytest.approx(
        [0.0, 0.015235, 0.029693], abs=1e-6
    )  # the code's first entries
    assert table[-1] == 0 and len(table) == 177
    x = torch.linspace(-8, 8, 200001)
    err = (TableGELU()(x) - torch.nn.functional.gelu(x)).abs().max().item()
    assert err <= 2e-4, err
    assert torch.equal(TableGELU()(torch.tensor([6.0, -6.0])), torch.tensor([6.0, 0.0]))  # ReLU beyond 5.5


def test_swapped_into_a_trained_vit_keeps_its_accuracy(trained_run):
    import vitkit
    from vitkit.models.inference import predict
    from vitkit.runs import Run

    run = Run.open(trained_run)
    val = run.data("val")
    model = vitkit.load(trained_run)
    ref = predict(model, val)
    approx = apply_edge_approx(vitkit.load(trained_run))
    got = predict(approx, val)
    acc = lambda logits: float((logits.argmax(1) == val.targets).double().mean())  # noqa: E731
    assert abs(acc(got) - acc(ref)) < 0.001  # < 0.1 pt on 359 images: the same predictions
    assert (got - ref).abs().max() < 5e-3


def test_refuses_a_model_without_the_ops():
    with pytest.raises(VitkitError, match=r"no vitkit attention softmax and no nn\.GELU"):
        apply_edge_approx(torch.nn.Sequential(torch.nn.Linear(2, 2)), {"softmax": False})
