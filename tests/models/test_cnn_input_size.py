"""A CNN built with img_size remembers it, so evaluation (and a teacher) feeds it the size it trained on."""

from __future__ import annotations

from vitkit.models import create_model, get_manifest, model_input_size
from vitkit.runs import build_from_manifest


def test_cnn_remembers_img_size_through_the_manifest():
    m = create_model("test_resnet", num_classes=10, img_size=32, in_chans=1)
    assert model_input_size(m) == (1, 32, 32)
    assert get_manifest(m).kwargs["img_size"] == 32
    rebuilt = build_from_manifest(get_manifest(m))
    assert model_input_size(rebuilt) == (1, 32, 32)
    # the timm default (160 px for test_resnet) is what it would have been evaluated at before
    assert model_input_size(create_model("test_resnet", num_classes=10))[1] == 160
