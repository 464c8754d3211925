from typing import ClassVar

import torch

from vitkit.analyze.s2 import S2Classifier, S2Wrapper, merge_chessboard, split_chessboard


def test_split_and_merge_are_exact_inverses():
    x = torch.randn(3, 2, 12, 12)
    for n in (1, 2, 3, 4):
        assert torch.equal(merge_chessboard(split_chessboard(x, n), n), x)


def test_scale_one_equals_forward_features_and_two_scales_double_the_channels(micro):
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        patches = micro.forward_features(x)[:, micro.num_prefix_tokens :]
        assert torch.equal(S2Wrapper(micro, scales=(1,), freeze=False)(x), patches)
        out = S2Wrapper(micro, scales=(1, 2), freeze=False)(x)
    assert out.shape == (2, 16, 2 * 64)
    assert torch.equal(out[..., :64], patches)


class _Pixels(torch.nn.Module):
    """An 'identity model' on a 2x2 grid of 1-pixel patches: its tokens are the pixels."""

    num_prefix_tokens = 0
    num_features = 1
    pretrained_cfg: ClassVar[dict] = {"input_size": (1, 2, 2)}

    def __init__(self):
        super().__init__()
        self.patch_embed = type("PE", (), {"grid_size": (2, 2), "img_size": (2, 2), "proj": None})()

    def forward_features(self, x):
        return x.flatten(2).transpose(1, 2)


def test_with_an_identity_model_the_2x_scale_is_the_area_resized_upsampled_input():
    x = torch.arange(4.0).view(1, 1, 2, 2)
    w = S2Wrapper(_Pixels(), scales=(1, 2), output="bchw", freeze=False)
    out = w(x)
    up = torch.nn.functional.interpolate(x, size=(4, 4), mode="bicubic", align_corners=False)
    assert torch.allclose(out[:, 1:], torch.nn.functional.interpolate(up, size=(2, 2), mode="area"))
    assert torch.equal(out[:, :1], x)


def test_probe_trains_only_the_head(micro):
    micro.zero_grad(set_to_none=True)  # earlier tests backpropagated through the shared fixture
    clf = S2Classifier(S2Wrapper(micro, scales=(1, 2)), num_classes=10)
    loss = clf(torch.randn(4, 3, 16, 16)).logsumexp(1).sum()
    loss.backward()
    assert clf.head.weight.grad is not None
    assert all(p.grad is None for p in micro.parameters())
    for p in micro.parameters():
        p.requires_grad_(True)  # the session fixture is shared
