"""Hyena N-D (models/hyena.py): the FFT convolution against F.conv2d, the operator against a
transcription of the official forward on the same weights, the receptive field of each direction,
other resolutions, and a model that trains on digits, reloads, exports and quantizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.models.hyena_reference import official_operator

from vitkit.errors import VitkitError
from vitkit.models import create_model
from vitkit.models.hyena import HyenaOperator2d, fft_conv2d


def test_fft_convolution_is_the_linear_convolution_of_conv2d():
    g = torch.Generator().manual_seed(0)
    v, k, b = (
        torch.randn(2, 3, 5, 5, generator=g),
        torch.randn(3, 5, 5, generator=g),
        torch.randn(3, generator=g),
    )
    # y[i, j] = sum over i' <= i, j' <= j of v[i', j'] k[i - i', j - j']: conv2d of the flipped kernel on a
    # grid padded at the top and left (no wrap-around)
    want = F.conv2d(F.pad(v, (4, 0, 4, 0)), k.flip(-1, -2)[:, None], groups=3) + v * b[:, None, None]
    torch.testing.assert_close(fft_conv2d(v, k, b), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("direction", ["seq", "standard", "4dir"])
@pytest.mark.parametrize("kind", ["2d", "product"])
def test_operator_equals_the_official_forward_on_the_same_weights(direction, kind):
    torch.manual_seed(0)
    op = HyenaOperator2d(16, l_max=4, filter=kind, direction=direction, filter_width=8).eval()
    x = torch.randn(3, 16, 16)
    with torch.no_grad():
        ours = op(x)
        official = official_operator(op, x, scale_fix=True)
        unscaled = official_operator(op, x, scale_fix=False)
    torch.testing.assert_close(ours, official, rtol=1e-4, atol=1e-5)
    # the official FFT divides the convolution by 2L: without undoing it the outputs differ
    assert (ours - unscaled).abs().max() > 1e-3


def test_each_direction_sees_its_quadrant_and_seq_lets_the_corner_see_everything():
    torch.manual_seed(0)
    L, d = 5, 8
    for direction, corner, sees_all in (
        ("standard", (0, 0), False),
        ("seq", (0, 0), True),
        ("4dir", (2, 2), True),
    ):
        op = HyenaOperator2d(d, l_max=L, direction=direction, filter_width=8)
        x = torch.randn(1, L * L, d, requires_grad=True)
        i, j = corner
        op(x)[0, i * L + j].sum().backward()
        g = x.grad[0].abs().sum(-1).reshape(L, L)
        reach = g > 1e-5 * g.max()  # the FFT leaves ~1e-8 round-off where the true convolution has zeros
        # beyond the 3x3 short filter only the long convolution reaches: its quadrant (or all of it)
        assert bool(reach[L - 1, L - 1]) == sees_all, direction


def test_a_hyena_vit_runs_at_other_resolutions_with_a_resampled_filter():
    m = create_model("vitkit_hyena_nano_p4_16", num_classes=3, dynamic_img_size=True).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 3)  # 8x8 grid, trained for 4x4
        assert m(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    f = m.blocks[0].attn.filter_fn
    z, _ = f.features(4)
    assert torch.equal(z, f.z)  # the training grid uses the learned table as it is
    assert f(8).shape == (32, 8, 8)


def test_hyena_options_and_bad_layouts():
    assert create_model("vitkit_hyena_nano_p4_16", num_classes=3, global_pool="corner")(
        torch.randn(1, 3, 16, 16)
    ).shape == (1, 3)
    with pytest.raises(VitkitError, match="no class or register tokens"):
        create_model("vitkit_hyena_nano_p4_16", class_token=True)
    with pytest.raises(VitkitError, match="direction must be"):
        create_model("vitkit_hyena_nano_p4_16", direction="diagonal")
    op = HyenaOperator2d(8, l_max=4)
    with pytest.raises(VitkitError, match="square patch grid"):
        op(torch.randn(1, 17, 8))


def test_hyena_vit_trains_reloads_exports_and_quantizes(tmp_path):
    """The house contract on a new family: a run trains past chance, reloads to the same outputs,
    exports to ONNX (the dynamo exporter, chosen by the model: torchscript has no FFT) with parity,
    gives forward_intermediates, and takes W8A8."""
    import vitkit
    from vitkit.api import train_model
    from vitkit.stages.export import export_run
    from vitkit.stages.quantize import quantize_run
    from vitkit.train import TrainConfig

    out = tmp_path / "hyena"
    cfg = TrainConfig(model="vitkit_hyena_nano_p4_16", data="digits", epochs=3, lr=3e-3, tensorboard=False)
    run = train_model(cfg, out, quiet=True)
    assert run.metrics["top1"] > 0.6, run.metrics  # 10 classes: chance is 0.1
    model = vitkit.load(out).eval()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(x), vitkit.load(out).eval()(x))
        feats = model.forward_intermediates(x, intermediates_only=True)
    assert len(feats) == 2 and feats[0].shape == (4, 32, 4, 4)
    doc = export_run(out, images=32).doc
    assert doc["exporter"] == "dynamo" and doc["max_abs_logit_diff"] < 1e-4, doc
    summary, _ = quantize_run(out, tmp_path / "q", w_bits=8, a_bits=8, calib_size=64)
    assert abs(summary["drop_points"]) < 3.0, summary


def test_hyena_options_go_through_model_kwargs_and_reload(tmp_path):
    """The documented route for the options (a --config file's model_kwargs) is allowed by the
    manifest, so a run with them reloads (vitkit.load accepts only allow-listed arguments)."""
    import vitkit
    from vitkit.runs import save_model

    m = create_model("vitkit_hyena_nano_p4_16", num_classes=3, direction="4dir", filter="product").eval()
    save_model(tmp_path, m, classes=["a", "b", "c"], task="classification", data="digits")
    again = vitkit.load(tmp_path).eval()
    assert again.blocks[0].attn.direction == "4dir" and again.blocks[0].attn.filter_fn.kind == "product"
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(again(x), m(x))
