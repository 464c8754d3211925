"""Dense models: heads over a plain timm ViT, the manifest's head, the siamese change model."""

from __future__ import annotations

import json

import pytest
import torch

import vitkit
from vitkit.errors import VitkitError
from vitkit.models import create_model, get_manifest
from vitkit.models.dense import ChangeModel, DenseModel, attach_dense_head, default_head_config


def _dense(head: str, pyramid: str = "sfp", task: str = "segmentation", img: int = 32) -> DenseModel:
    torch.manual_seed(0)
    m = create_model("vitkit_micro_p4_16", num_classes=5, img_size=img)
    return attach_dense_head(m, default_head_config(m, 3, task=task, head=head, pyramid=pyramid))


@pytest.mark.parametrize(
    ("head", "pyramid"), [("linear", "sfp"), ("upernet", "sfp"), ("upernet", "multilevel")]
)
def test_dense_models_map_images_to_per_pixel_logits(head, pyramid):
    m = _dense(head, pyramid).eval()
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 3, 32, 32)
    assert m.num_classes == 3 and m.backbone.num_classes == 0
    manifest = get_manifest(m)
    assert manifest.head["head"] == head and manifest.kwargs["num_classes"] == 0
    assert get_manifest(m.backbone) is None  # one manifest, on the wrapper
    if head == "upernet":
        # the pyramid sits at strides 4, 8, 16, 32 px whatever the patch (4 px here)
        assert [tuple(f.shape[-2:]) for f in m.features(x)] == [(8, 8), (4, 4), (2, 2), (1, 1)]
    # the prediction at a pixel depends on the image (not a constant head)
    y = m(x)
    assert (y[0] - y[1]).abs().max() > 1e-3


def test_dense_runs_save_and_load_to_the_same_outputs(tmp_path):
    m = _dense("upernet").eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
        for mod in m.modules():  # running stats of the head's BatchNorms are weights too
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
    x = torch.randn(2, 3, 32, 32)
    vitkit.save_model(tmp_path / "run", m, classes=["a", "b", "c"], task="segmentation")
    doc = json.loads((tmp_path / "run" / "model.json").read_text())
    assert doc["head"]["head"] == "upernet" and doc["head"]["num_classes"] == 3
    loaded = vitkit.load(tmp_path / "run")
    assert isinstance(loaded, DenseModel)
    torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=1e-6)

    doc["head"]["head"] = "maskformer"
    (tmp_path / "run" / "model.json").write_text(json.dumps(doc))
    with pytest.raises(VitkitError, match=r"model\.json 'head'.*head") as e:
        vitkit.load(tmp_path / "run")
    assert "\n" not in str(e.value)


def test_change_model_is_symmetric_in_its_two_dates():
    """|f(A) - f(B)|: swapping the dates gives the same change logits, equal dates a constant map."""
    m = _dense("upernet", task="change").eval()
    assert isinstance(m, ChangeModel)
    from vitkit.models import model_input_size

    assert model_input_size(m) == (6, 32, 32)
    a, b = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ab, ba = m(torch.cat([a, b], 1)), m(torch.cat([b, a], 1))
        same = m(torch.cat([a, a], 1))
    torch.testing.assert_close(ab, ba, rtol=0, atol=1e-5)
    assert (ab[0] - ab[1]).abs().max() > 1e-3
    assert (same[0] - same[1]).abs().max() < 1e-5  # no difference in, the same map out
    with pytest.raises(ValueError, match="6 channels"):
        m(a)


def test_heads_refuse_what_they_cannot_decode():
    m = create_model("vitkit_micro_p4_16", num_classes=0)  # 16 px: a 4x4 grid of 4 px patches
    with pytest.raises(VitkitError, match="pyramid 'multilevel' takes four blocks at four strides"):
        default_head_config(m, 3, pyramid="multilevel")
    cnn = create_model("resnet10t", num_classes=0)
    with pytest.raises(VitkitError, match="dense heads need a plain timm ViT"):
        default_head_config(cnn, 3)


# -- ChangeViT against a re-implementation of the official code (tests/models/changevit_reference.py) --
def _reference():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "changevit_reference", Path(__file__).parent / "changevit_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_changevit_decoder_and_detail_capture_match_the_official_logic():
    ref = _reference()

    from vitkit.models.changevit import ChangeDecoder, DetailCapture, bce_dice_loss

    torch.manual_seed(0)
    dims = (8, 16, 32, 32)  # CNN widths, ViT width; 8x8 tokens of a 128 px image at patch 16
    theirs, ours = ref.Decoder(in_dim=dims, num_heads=8), ChangeDecoder(dims, num_heads=8)
    ours.load_state_dict(theirs.state_dict())  # the official names: their weights load as they are
    cnn_ref, cnn = ref.DetailCapture(stem=8, widths=dims[:3]), DetailCapture(3, dims[:3])
    cnn.load_state_dict(cnn_ref.state_dict())
    for m in (theirs, ours, cnn_ref, cnn):
        m.eval()
    a, b = torch.randn(2, 3, 128, 128), torch.randn(2, 3, 128, 128)
    va, vb = torch.randn(2, 32, 8, 8), torch.randn(2, 32, 8, 8)  # the ViT maps
    with torch.no_grad():
        fa, fb = [*cnn(a), va], [*cnn(b), vb]
        for got, want in zip(fa, [*cnn_ref(a), va]):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        z = ours(fa, fb)
        prob = theirs(fa, fb)
    assert z.shape == prob.shape == (2, 1, 128, 128)
    torch.testing.assert_close(torch.sigmoid(z), prob, rtol=0, atol=1e-6)
    # the loss: BCE + 1 - batch Dice, as the official one on probabilities
    t = (torch.rand(2, 128, 128) < 0.2).long()
    want = ref.bce_dice_loss(prob, t[:, None].float())
    torch.testing.assert_close(bce_dice_loss(z[:, 0], t), want, rtol=0, atol=1e-5)
    # ignored pixels leave both terms
    t_ign = t.clone()
    t_ign[:, :64] = 255
    want = ref.bce_dice_loss(prob[..., 64:, :], t[:, None, 64:].float())
    torch.testing.assert_close(bce_dice_loss(z[:, 0], t_ign), want, rtol=0, atol=1e-5)


def test_changevit_model_saves_loads_and_thresholds_like_the_paper(tmp_path):
    from vitkit.models.dense import ChangeViTModel

    torch.manual_seed(0)
    m = create_model("vitkit_micro_p4_16", num_classes=2, img_size=32)
    m = attach_dense_head(m, default_head_config(m, 2, task="change", head="changevit", detail_width=8))
    assert isinstance(m, ChangeViTModel)
    m.eval()
    x = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        y = m(x)
    assert y.shape == (2, 2, 32, 32) and torch.equal(y[:, 0], torch.zeros_like(y[:, 0]))
    # argmax is the official sigmoid(z) > 0.5
    assert torch.equal(y.argmax(1), (torch.sigmoid(y[:, 1]) > 0.5).long())
    vitkit.save_model(tmp_path / "run", m, classes=["unchanged", "changed"], task="change:head=changevit")
    loaded = vitkit.load(tmp_path / "run")
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=1e-6)
    with pytest.raises(VitkitError, match="change task"):
        default_head_config(m.backbone, 3, task="segmentation", head="changevit")
