"""Every compression transform exports to ONNX and runs in onnxruntime with the same logits."""

from __future__ import annotations

import pytest
import torch

from vitkit.deploy import export_onnx
from vitkit.models import create_model


def _tome(m):
    from vitkit.compress.tokens import apply_tome

    return apply_tome(m, {"r": 3})


def _evit(m):
    from vitkit.compress.tokens import apply_evit

    return apply_evit(m, {"keep": 0.5})


def _structured(m):
    from vitkit.compress.prune import apply_structured_prune

    return apply_structured_prune(m, {"heads": 0.5, "mlp": 0.5})


def _dimap(m):
    from vitkit.compress.prune import apply_dimap

    return apply_dimap(m, {"sparsity": 0.5})


def _repavit(m):
    from vitkit.compress.reparam import apply_repavit, reparameterize

    return reparameterize(apply_repavit(m, {"idle": 0.75}))


def _linear(m):
    from vitkit.compress.linear_attention import apply_linear_attention

    return apply_linear_attention(m)


def _exits(m):
    from vitkit.compress.exits import apply_exits

    return apply_exits(m, {"exits": [2]})


TRANSFORMS = {"tome": _tome, "evit": _evit, "structured": _structured, "dimap": _dimap,
              "repavit_reparam": _repavit, "linear_attention": _linear, "exits": _exits}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(TRANSFORMS))
def test_export_parity(tmp_path, kind):
    torch.manual_seed(0)
    # registers and average pooling: prefix handling and ToMe's unmerge go through the exporter too
    m = create_model("vitkit_micro_p4_16", reg_tokens=1, global_pool="avg")
    m = TRANSFORMS[kind](m).eval()
    images = torch.randn(3, 3, 16, 16)  # exported at batch 2: the batch axis stays dynamic
    res = export_onnx(m, tmp_path / f"{kind}.onnx", (3, 16, 16), check_images=images, bound=1e-4)
    assert res.max_abs_diff is not None and res.max_abs_diff <= 1e-4
