"""ViT-CoMer against a line-by-line re-implementation of the official code
(tests/architecture/comer_reference.py, written from Traffic-X/ViT-CoMer @ b57f386), and as a transform
of a dense run: save/load, ONNX parity, refusals."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import vitkit
from vitkit.architecture.comer import (
    CNNBranch,
    CTIBlock,
    MSDeformAttn,
    ViTCoMerConfig,
    apply_vit_comer,
    ms_deform_attn_core,
    reference_points,
)
from vitkit.errors import VitkitError


def _reference():
    spec = importlib.util.spec_from_file_location(
        "comer_reference", Path(__file__).parent / "comer_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _reference()
SHAPES = [(8, 8), (4, 4), (2, 2)]  # c2, c3 (the 4x4 token grid), c4
DATA = "canvas:size=32,classes=3,train=16,val=8"


def _perturb(*modules: nn.Module) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
            for b in m.buffers():
                if b.is_floating_point():
                    b.add_(0.05 * torch.rand(b.shape, generator=g))


def test_deformable_attention_core_samples_what_the_cuda_kernel_samples():
    g = torch.Generator().manual_seed(0)
    n, m, d, lq, p = 2, 2, 4, 5, 3
    value = torch.randn(n, sum(h * w for h, w in SHAPES), m, d, generator=g)
    loc = torch.rand(n, lq, m, 3, p, 2, generator=g) * 1.2 - 0.1  # some points outside: zeros there
    w = torch.rand(n, lq, m, 3, p, generator=g)
    got = ms_deform_attn_core(value, SHAPES, loc, w)
    torch.testing.assert_close(got, ref._ms_deform_attn_naive(value, SHAPES, loc, w), rtol=0, atol=1e-5)
    torch.testing.assert_close(got, ref.ms_deform_attn_core_pytorch(value, SHAPES, loc, w), rtol=0, atol=1e-6)


def test_msdeformattn_matches_the_official_module():
    torch.manual_seed(0)
    theirs, ours = ref.MSDeformAttn(16, n_levels=3, n_heads=4, n_points=2), MSDeformAttn(16, 3, 4, 2)
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours.sampling_offsets.bias, theirs.sampling_offsets.bias)  # the same init
    _perturb(theirs)
    ours.load_state_dict(theirs.state_dict())
    n_tokens = sum(h * w for h, w in SHAPES)
    q, feat = torch.randn(2, n_tokens, 16), torch.randn(2, n_tokens, 16)
    refp = reference_points(SHAPES, torch.device("cpu"))
    their_ref = ref.get_reference_points(SHAPES, "cpu")
    torch.testing.assert_close(refp, their_ref, rtol=0, atol=0)
    shapes_t = torch.tensor(SHAPES)
    start = torch.cat([shapes_t.new_zeros(1), shapes_t.prod(1).cumsum(0)[:-1]])
    want = theirs(q, their_ref, feat, shapes_t, start)
    torch.testing.assert_close(ours(q, refp, feat, SHAPES), want, rtol=0, atol=1e-6)


class _Blocks(nn.Module):
    """The reference's ViT blocks (forward(x, H, W)) as timm-style blocks (forward(x))."""

    def __init__(self, blk: nn.Module, h: int, w: int):
        super().__init__()
        self.blk, self.h, self.w = blk, h, w

    def forward(self, x):
        return self.blk(x, self.h, self.w)


@pytest.mark.parametrize("extra", [False, True])
def test_one_interaction_matches_the_official_ctiblock(extra):
    """MRFP, CTI_toV (gamma moved off 0), the ViT blocks, CTI_toC and the extra CTIs, in the official order."""
    torch.manual_seed(0)
    dim, heads = 16, 4
    theirs = ref.CTIBlock(dim, num_heads=heads, n_points=2, drop_path=0.0, extra_CTI=extra, dim_ratio=6.0,
                          cnn_feature_interaction=True)  # fmt: skip
    cfg = ViTCoMerConfig(n_points=2, drop_path=0.0, dim_ratio=6.0)
    ours = CTIBlock(dim, cfg, heads, extra=extra)
    _perturb(theirs)
    ours.load_state_dict(theirs.state_dict())
    blocks = [ref.Block(dim, 2) for _ in range(2)]
    for m in (theirs, ours, *blocks):
        m.eval()
    h, w = SHAPES[1]
    x = torch.randn(2, h * w, dim)
    c = torch.randn(2, sum(a * b for a, b in SHAPES), dim)
    with torch.no_grad():
        want_x, want_c = theirs(x, c, blocks, None, [None] * 3, h, w)
        got_t, got_c = ours(
            x, c, [_Blocks(b, h, w) for b in blocks], 0, reference_points(SHAPES, x.device), SHAPES
        )
    torch.testing.assert_close(got_t, want_x, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_c, want_c, rtol=0, atol=1e-5)


def test_cnn_branch_matches_the_official_spm():
    torch.manual_seed(0)
    theirs, ours = ref.CNN(inplanes=8, embed_dim=16, stem_pool=True), CNNBranch(3, 8, 16, patch=16)
    _perturb(theirs)
    ours.load_state_dict(theirs.state_dict())
    theirs.eval(), ours.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        c1, c2, c3, c4 = theirs(x)
        got = ours(x)
    torch.testing.assert_close(got[0], c1, rtol=0, atol=1e-6)
    for g, t in zip(got[1:], (c2, c3, c4)):
        torch.testing.assert_close(g.flatten(2).transpose(1, 2), t, rtol=0, atol=1e-6)
    assert [tuple(t.shape[-2:]) for t in got] == [(16, 16), (8, 8), (4, 4), (2, 2)]  # strides p/4 .. 2p


# -- the transform on a dense model --------------------------------------------------------------------
def _dense(size: int = 32):
    from vitkit.models import create_model
    from vitkit.models.dense import attach_dense_head, default_head_config

    torch.manual_seed(0)
    m = create_model("vitkit_micro_p4_16", num_classes=4, img_size=size)
    return attach_dense_head(m, default_head_config(m, 4))


def test_vit_comer_run_saves_loads_and_exports(tmp_path):
    from vitkit.stages.export import export_run

    m = apply_vit_comer(_dense(), {"conv_inplane": 8})
    _perturb(m)
    m.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = m(x)
    assert y.shape == (2, 4, 32, 32)
    # the pyramid the head reads is the one it was built for
    assert [tuple(f.shape[-2:]) for f in m.features(x)] == [(8, 8), (4, 4), (2, 2), (1, 1)]
    run = tmp_path / "run"
    vitkit.save_model(run, m, classes=["background", "0", "1", "2"], task="segmentation",
                      data={"uri": DATA})  # fmt: skip
    doc = json.loads((run / "model.json").read_text())
    assert [t["name"] for t in doc["transforms"]] == ["vit-comer"] and doc["head"]["head"] == "upernet"
    loaded = vitkit.load(run)
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=1e-6)
    exported = export_run(run, images=8, data=DATA).doc
    assert exported["max_abs_logit_diff"] < 1e-4 and exported["transforms"] == ["vit-comer"]


def test_vit_comer_refuses_what_it_cannot_build():
    from vitkit.models import create_model
    from vitkit.stages.quantize import quantize_run  # noqa: F401  (the refusal below comes from the registry)

    with pytest.raises(VitkitError, match="--task segmentation"):
        apply_vit_comer(create_model("vitkit_micro_p4_16", num_classes=3))
    m = apply_vit_comer(_dense())
    with pytest.raises(VitkitError, match="already replaced"):
        apply_vit_comer(m)
    with pytest.raises(VitkitError, match="conv_inplane"):
        apply_vit_comer(_dense(), {"conv_inplane": 0})
    with pytest.raises(VitkitError, match="even sides"):
        apply_vit_comer(_dense(size=20))
    with pytest.raises(VitkitError, match="cannot quantize a model with transform 'vit-comer'"):
        vitkit.quantize(m, torch.randn(8, 3, 32, 32), method="minmax", calib_size=8, calib_batch=8)


def test_vit_comer_trains_through_the_cli_on_segmentation_only(bad_input, tmp_path):
    bad_input(
        ["train", "--data", "digits", "--transform", "vit-comer", "--epochs", "1", "-o", tmp_path / "c"],
        "vit-comer builds the feature pyramid of a segmentation head",
        workdir=tmp_path,
    )
