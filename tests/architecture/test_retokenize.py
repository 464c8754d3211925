"""Progressive re-tokenization (As-ViT): coarse tokens for the first part of training, the model's own
after; the trained model is the same function at its own tokenization and reloads exactly."""

from __future__ import annotations

import pytest
import torch

from vitkit.architecture.retokenize import CoarseTokens, RetokenizeConfig, apply_retokenize, set_token_stride
from vitkit.errors import VitkitError
from vitkit.models import create_model


def test_transform_keeps_the_function_and_coarse_stride_quarters_the_tokens():
    m = create_model("vitkit_micro_p4_16", num_classes=10).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = m(x)
        apply_retokenize(m, {"stride": 2})
        torch.testing.assert_close(m(x), before, rtol=0, atol=0)  # at its own stride: the same model
        set_token_stride(m, 2)
        assert m.forward_features(x).shape == (2, 1 + 4, 64)  # 16 patch tokens -> 4
        set_token_stride(m, 1)
        assert m.forward_features(x).shape == (2, 1 + 16, 64)


def test_schedule_follows_the_epoch(monkeypatch):
    m = create_model("vitkit_micro_p4_16", num_classes=10)
    apply_retokenize(m, {})
    cb = CoarseTokens(RetokenizeConfig(stride=2, until=0.5))

    class Ctx:
        model = m

        class cfg:
            epochs = 4

    strides = []
    for epoch in range(4):
        cb.on_epoch_start(Ctx, epoch)
        strides.append(m.patch_embed.proj.stride[0])
    assert strides == [8, 8, 4, 4]
    cb.on_train_end(Ctx)
    assert m.patch_embed.proj.stride == (4, 4)


def test_trains_and_reloads(tmp_path):
    import vitkit
    from vitkit.stages.train import train_model

    cfg = dict(model="vitkit_micro_p4_16", data="digits", epochs=4, lr=3e-3, threads=1, tensorboard=False,
               transforms=["retokenize:stride=2,until=0.5"])  # fmt: skip
    run = train_model(cfg, tmp_path / "r", quiet=True)
    assert run.model.patch_embed.proj.stride == (4, 4) and run.metrics["top1"] > 0.25  # chance 0.1
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(vitkit.load(tmp_path / "r")(x), run.model.eval()(x), rtol=0, atol=1e-6)


def test_bad_input():
    with pytest.raises(VitkitError, match="convolutional patch embedding"):
        apply_retokenize(create_model("resnet18", num_classes=10))
    with pytest.raises(VitkitError, match="until"):
        from vitkit.architecture.retokenize import train_transform

        train_transform({"until": "1.5"})
