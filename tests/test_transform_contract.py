"""The transform chain holds for every registered transform (issue 18, part 4).

For each name in ``vitkit.registry.known_transforms()`` a recipe below applies it to a trained
vitkit_nano_p4_16; then the model must: save -> ``vitkit.load`` -> the same outputs; answer timm's
``forward_intermediates`` with the final features of ``forward_features``; deep-copy to the same
outputs; export through ``vitkit export``'s path with its rule's parity (or be refused with the rule's
reason); and quantize (W8A8) then export the real INT8 graph (or be refused with a reason). A
registered transform without a recipe fails the test, so a new transform cannot skip the contract.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import vitkit
from vitkit.errors import VitkitError
from vitkit.models.dense import DenseModel
from vitkit.registry import known_transforms

CLASSES = [str(i) for i in range(10)]
X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
EXPORT_IMAGES = 100  # real validation images for the parity checks (one flip = 1% agreement)


def _gmm(m, data):
    from vitkit.architecture.gmm import apply_gmm

    return apply_gmm(m, {"k": 3})


def _ewa(m, data):
    from vitkit.architecture.ewa import apply_ewa

    return apply_ewa(m, {"experts": 2, "every": 1})


def _ewa_merge(m, data):
    from vitkit.architecture.ewa import merge_ewa

    return merge_ewa(_ewa(m, data))


def _stem(m, data):
    from vitkit.architecture.stem import apply_stem

    return apply_stem(m, {"compression": 2})


def _temperature(m, data):
    from vitkit.analyze.patches import apply_attention_temperature

    return apply_attention_temperature(m, {"temperature": 1.5})


def _dist_token(m, data):
    from vitkit.distill.deit import apply_dist_token

    return apply_dist_token(m)


def _adapt(fn_name: str, cfg: dict) -> Callable:
    def recipe(m, data):
        import vitkit.adapt as adapt

        return getattr(adapt, fn_name)(m, cfg)

    return recipe


def _tome(m, data):
    from vitkit.compress.tokens import apply_tome

    return apply_tome(m, {"r": 2})


def _evit(m, data):
    from vitkit.compress.tokens import apply_evit

    return apply_evit(m, {"keep": 0.5})


def _pvc(m, data):
    from vitkit.compress.tokens import apply_pvc

    return apply_pvc(m, {"patch": 2, "at": [0], "mode": "mlp"})


def _retokenize(m, data):
    from vitkit.architecture.retokenize import apply_retokenize

    return apply_retokenize(m, {"stride": 2})


def _edge_approx(m, data):
    from vitkit.compress.approx import apply_edge_approx

    return apply_edge_approx(m)


def _exits(m, data):
    from vitkit.compress.exits import apply_exits

    return apply_exits(m, {"exits": [1]})


def _repavit(m, data):
    from vitkit.compress.reparam import apply_repavit

    return apply_repavit(m, {"idle": 0.75})


def _repavit_reparam(m, data):
    from vitkit.compress.reparam import reparameterize

    return reparameterize(_repavit(m, data))


def _prune_structured(m, data):
    from vitkit.compress.prune import apply_structured_prune

    return apply_structured_prune(m, {"heads": 0.5, "mlp": 0.5})


def _lpvit(m, data):
    from vitkit.compress.prune.lpvit import apply_lpvit

    return apply_lpvit(m, {"flops": 0.6, "block": 16, "importance": "l1"}, data.train, calib_batches=1)


def _dimap(m, data):
    from vitkit.compress.prune import apply_dimap

    return apply_dimap(m, {"sparsity": 0.5})


def _linear_attention(m, data):
    from vitkit.compress.linear_attention import apply_linear_attention

    return apply_linear_attention(m)


def _vit_comer(m, data):
    """A dense transform: the trained ViT under a segmentation head first (issue 19)."""
    from vitkit.architecture.comer import apply_vit_comer
    from vitkit.models.dense import attach_dense_head, default_head_config

    dense = attach_dense_head(m, default_head_config(m, 10))
    return apply_vit_comer(dense, {"conv_inplane": 8})


def _quantize(m, data):
    return vitkit.quantize(m, data.train, method="minmax", w_bits=8, a_bits=8, calib_size=32)


RECIPES: dict[str, Callable[[nn.Module, object], nn.Module]] = {
    "gmm": _gmm,
    "ewa": _ewa,
    "ewa_merge": _ewa_merge,
    "stem": _stem,
    "attention_temperature": _temperature,
    "dist_token": _dist_token,
    "lora": _adapt("apply_lora", {"targets": ["qkv", "proj", "fc1", "fc2"]}),
    "lora-qv": _adapt("apply_lora_qv", {}),
    "vpt": _adapt("apply_vpt", {"num_prompts": 2, "deep": True}),
    "dvpt": _adapt("apply_dvpt", {}),
    "explora": _adapt("apply_explora", {}),
    "tome": _tome,
    "evit": _evit,
    "pvc": _pvc,
    "retokenize": _retokenize,
    "edge_approx": _edge_approx,
    "exits": _exits,
    "repavit": _repavit,
    "repavit_reparam": _repavit_reparam,
    "prune_structured": _prune_structured,
    "lpvit": _lpvit,
    "dimap": _dimap,
    "linear_attention": _linear_attention,
    "quantize": _quantize,
    "vit-comer": _vit_comer,
}

# What "quantize, then export" gives where it is not the INT8 graph: (stage, the reason it names).
_AFTER_QUANTIZATION = "is not exportable after quantization: its export step"
QUANTIZE_THEN_EXPORT_REFUSED = {
    "quantize": ("quantize", "already quantized"),
    "linear_attention": (
        "quantize",
        "cannot quantize a model with transform 'linear_attention': its attention",
    ),
    "vit-comer": ("quantize", "cannot quantize a model with transform 'vit-comer': its deformable"),
    "edge_approx": ("quantize", "cannot quantize a model with transform 'edge_approx': its single-pass"),
    # their export step merges weights: on a quantized model it would rewrite calibrated weights
    "lora": ("export", "transform 'lora' " + _AFTER_QUANTIZATION),
    "lora-qv": ("export", "transform 'lora-qv' " + _AFTER_QUANTIZATION),
    "explora": ("export", "transform 'explora' " + _AFTER_QUANTIZATION),
    "ewa": ("export", "transform 'ewa' " + _AFTER_QUANTIZATION),
}


@pytest.fixture(scope="module")
def trained_nano(tmp_path_factory):
    """vitkit_nano_p4_16 trained 3 epochs on digits: logits with real margins, so INT8 agreement means something."""
    from vitkit.api import train_model
    from vitkit.train import TrainConfig

    out = tmp_path_factory.mktemp("contract") / "nano"
    cfg = TrainConfig(
        model="vitkit_nano_p4_16", data="digits", epochs=3, batch_size=64, lr=3e-3, tensorboard=False
    )
    train_model(cfg, out, quiet=True)
    return out


def test_every_registered_transform_has_a_recipe():
    missing = sorted(set(known_transforms()) - set(RECIPES))
    assert not missing, f"add a recipe to tests/test_transform_contract.py for: {missing}"


def _perturbed(model: nn.Module) -> nn.Module:
    """Move every parameter a little, so fresh adapters (LoRA B = 0, zero gates) are not no-ops and a
    reload that dropped them would show."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(0.01 * torch.randn(p.shape, generator=g).to(p.dtype))
    return model


def _outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def _save(run, model) -> None:
    vitkit.save_model(run, model, classes=CLASSES, data={"uri": "digits"})


def _export(run):
    from vitkit.stages.export import export_run

    return export_run(run, data="digits", images=EXPORT_IMAGES)


def _refusal_reason(names: list[str]) -> str | None:
    from vitkit.registry import technique

    rules = [technique(n).export for n in names]
    return next((r.not_exportable for r in rules if r.not_exportable), None)


def _check_export(run, names: list[str]) -> None:
    reason = _refusal_reason(names)
    if reason is not None:
        with pytest.raises(VitkitError, match="is not exportable: " + reason[:40]):
            _export(run)
        return
    doc = _export(run).doc
    assert doc["max_abs_logit_diff"] <= doc["bound"]
    if "quantize" in names:  # the real INT8 graph, held to the rule's agreement
        assert doc["int8_ops"]["QuantizeLinear"] > 0 and doc["int8_ops"]["DequantizeLinear"] > 0
        assert doc["top1_agreement"] >= doc["approximate"]["min_top1_agreement"]
    else:
        assert doc["bound"] == 1e-4 and doc["top1_onnx"] == doc["top1_pytorch"]


@pytest.mark.parametrize("name", known_transforms())
def test_transform_contract(name, trained_nano, digits, tmp_path):
    assert name in RECIPES, f"no recipe for registered transform '{name}' (see test above)"
    torch.manual_seed(0)
    model = RECIPES[name](vitkit.load(trained_nano), digits)
    if name != "quantize":  # calibrated scales belong to the weights they were calibrated on
        model = _perturbed(model)
    model.eval()
    names = [t.name for t in vitkit.models.get_manifest(model).transforms]
    assert name in names
    ref = _outputs(model)

    # save -> load -> the same outputs
    run = tmp_path / "run"
    _save(run, model)
    loaded = vitkit.load(run)
    torch.testing.assert_close(_outputs(loaded), ref, rtol=0, atol=1e-6)

    # timm's feature contract: the final features of forward_intermediates are forward_features
    # (a dense model's backbone keeps it; the model itself maps images to per-pixel logits)
    backbone = loaded.backbone if isinstance(loaded, DenseModel) else loaded
    with torch.no_grad():
        final, inter = backbone.forward_intermediates(X, output_fmt="NLC")
        feats = backbone.forward_features(X)
    assert len(inter) == len(backbone.blocks)
    torch.testing.assert_close(final, feats, rtol=0, atol=1e-6)

    # deep copies (timm's EMA, export preparation) compute the same function
    torch.testing.assert_close(_outputs(copy.deepcopy(loaded)), ref, rtol=0, atol=1e-6)

    # export through `vitkit export`: the rule's parity, or its refusal with the reason
    _check_export(run, names)

    # quantize (W8A8), then export: the real INT8 graph, or a refusal that names the reason
    refused = QUANTIZE_THEN_EXPORT_REFUSED.get(name)
    if refused is not None and refused[0] == "quantize":
        with pytest.raises(VitkitError, match=refused[1]):
            _quantize(loaded, digits)
        return
    quantized = _quantize(loaded, digits)
    qrun = tmp_path / "quantized"
    _save(qrun, quantized)
    torch.testing.assert_close(_outputs(vitkit.load(qrun)), _outputs(quantized), rtol=0, atol=1e-6)
    if refused is not None:
        with pytest.raises(VitkitError, match=refused[1]):
            _export(qrun)
        return
    _check_export(qrun, [*names, "quantize"])
