"""``create_model``: timm's factory plus vitkit's attention module and manifest."""

from __future__ import annotations

import difflib
import math
import os
from typing import Any

import timm
from torch import nn

from vitkit.errors import VitkitError, upstream_reason
from vitkit.models import presets  # noqa: F401  (registers the vitkit_* presets into timm)
from vitkit.models.attention import use_vitkit_attention
from vitkit.models.manifest import Manifest, set_manifest


def _check_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else " (see `timm.list_models('*vit*')`)"
    raise VitkitError(f"unknown model '{name}': not a timm or vitkit model name{hint}")


def create_model(
    name: str,
    num_classes: int | None = None,
    img_size: int | None = None,
    in_chans: int | None = None,
    *,
    pretrained_file: str | os.PathLike | None = None,
    unfused_attention: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """Build any timm model (and the ``vitkit_*`` presets) ready for vitkit's techniques.

    Args:
        name: a timm model name, e.g. ``deit_tiny_distilled_patch16_224`` or ``vitkit_micro_p4_16``.
        num_classes, img_size, in_chans: passed to timm when given (``img_size`` only to models that
            take it; CNNs are size-agnostic).
        pretrained_file: a local checkpoint (``.safetensors`` or a weights-only ``.pth``) loaded through
            timm's own filter (position embeddings resampled, a head of another size dropped).
            Nothing is ever downloaded.
        unfused_attention: swap timm ``Attention`` for :class:`~vitkit.models.VitkitAttention`
            (numerically identical, with hook points).
        **kwargs: any other timm constructor argument (``drop_path_rate``, ``qk_norm``, ...).

    The model carries a manifest (``model.vitkit_manifest``) naming how to rebuild it.
    """
    _check_name(name)
    build_kwargs: dict[str, Any] = dict(kwargs)
    if num_classes is not None:
        build_kwargs["num_classes"] = int(num_classes)
    if in_chans is not None:
        build_kwargs["in_chans"] = int(in_chans)
    if img_size is not None:
        build_kwargs["img_size"] = int(img_size)

    load_kwargs: dict[str, Any] = {}
    if pretrained_file is not None:
        path = os.fspath(pretrained_file)
        if not os.path.isfile(path):
            raise VitkitError(f"pretrained file '{path}' does not exist")
        overlay: dict[str, Any] = {"file": path}
        file_classes = _checkpoint_num_classes(name, path)
        if file_classes is not None:
            # timm keeps the checkpoint's head only when its size is the cfg's num_classes.
            overlay["num_classes"] = file_classes
        load_kwargs = {"pretrained": True, "pretrained_cfg_overlay": overlay}

    try:
        model = timm.create_model(name, **build_kwargs, **load_kwargs)
    except TypeError as e:
        if "img_size" in str(e) and "img_size" in build_kwargs:
            # CNNs take any input size and reject the argument: build without it, then remember the
            # size as the model's input size (so evaluation and teachers feed it what it trained on).
            cnn_kwargs = {k: v for k, v in build_kwargs.items() if k != "img_size"}
            model = timm.create_model(name, **cnn_kwargs, **load_kwargs)
            _set_input_size(model, build_kwargs["img_size"], build_kwargs.get("in_chans"))
        else:
            raise VitkitError(f"model '{name}' rejected its arguments {sorted(build_kwargs)}: {e}") from e
    except (RuntimeError, ValueError, AssertionError) as e:
        if pretrained_file is not None:
            raise VitkitError(
                f"could not load '{pretrained_file}' into '{name}': {str(e).splitlines()[0]}"
            ) from e
        raise VitkitError(f"could not build '{name}' with {build_kwargs}: {str(e).splitlines()[0]}") from e

    if img_size is not None:
        _check_patch_grid(model, name, int(img_size))
    if unfused_attention:
        use_vitkit_attention(model)
    set_manifest(model, Manifest(name=name, kwargs=build_kwargs))
    return model


def _check_patch_grid(model: nn.Module, name: str, img_size: int) -> None:
    """Refuse an ``img_size`` that is not a multiple of the patch size.

    timm's patch embedding is a conv with stride = patch size and builds its grid with floor
    division, so at 18 px with 4 px patches it silently ignores the last 2 pixel rows and columns.
    Padding instead needs both ``dynamic_img_pad`` and ``dynamic_img_size`` (with the pad alone the
    position embedding is one row short and the forward pass fails), so only that pair is let through.
    """
    from timm.layers import PatchEmbed

    pe = getattr(model, "patch_embed", None)
    if not isinstance(pe, PatchEmbed) or pe.img_size is None:
        return  # hybrid/conv stems: their own stride arithmetic
    if getattr(pe, "dynamic_img_pad", False) and getattr(model, "dynamic_img_size", False):
        return
    ph, pw = pe.patch_size
    step = math.lcm(ph, pw)
    if img_size % step == 0:
        return
    lower, upper = img_size // step * step, (img_size // step + 1) * step
    sizes = f"{lower} or {upper}" if lower > 0 else str(upper)
    patch = str(ph) if ph == pw else f"{ph}x{pw}"
    raise VitkitError(
        f"img_size {img_size} is not a multiple of the patch size {patch} of '{name}' (the patch embedding "
        f"would silently drop the last {img_size % step} pixel rows and columns); use img_size {sizes}, or "
        "model_kwargs dynamic_img_pad and dynamic_img_size true to pad"
    )


def _set_input_size(model: nn.Module, img_size: int, in_chans: int | None = None) -> None:
    """Record ``img_size`` in a size-agnostic model's pretrained cfg (its declared input size)."""
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    c = in_chans or cfg.get("input_size", (3, img_size, img_size))[0]
    cfg["input_size"] = (c, img_size, img_size)
    cfg.pop("test_input_size", None)
    model.pretrained_cfg = model.default_cfg = cfg


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) the model expects, from its pretrained cfg and patch embedding."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    c, h, w = cfg.get("input_size", (3, 224, 224))
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        h, w = pe.img_size
        proj = getattr(pe, "proj", None)
        if getattr(pe, "in_chans", None):
            # hybrid embeddings (a CNN before ``proj``) say it themselves: proj sees features, not pixels
            c = pe.in_chans
        elif isinstance(proj, nn.Conv2d):
            c = proj.in_channels
    return int(c), int(h), int(w)


def model_normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the model's inputs are normalized with, from ``pretrained_cfg``."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    return mean, std


def num_prefix_tokens(model: nn.Module) -> int:
    return int(getattr(model, "num_prefix_tokens", 0))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _checkpoint_num_classes(name: str, path: str) -> int | None:
    """The head size stored in a checkpoint (None when it has no head the model's cfg names)."""
    from timm.models import get_pretrained_cfg
    from timm.models._helpers import load_state_dict

    try:
        # Always read it here first with weights_only=True, even when the head size is not needed:
        # timm then loads it again with its own default, which older timm/torch (allowed by
        # pyproject) set to a full unpickle. A file that passes the weights-only load references no
        # globals beyond tensors and plain containers, so the second load cannot run code either.
        state = load_state_dict(path, weights_only=True)
    except Exception as e:
        raise VitkitError(f"cannot read pretrained file '{path}': {upstream_reason(e)}") from e
    cfg = get_pretrained_cfg(name)
    classifier = getattr(cfg, "classifier", None) if cfg is not None else None
    if not classifier:
        return None
    first = classifier[0] if isinstance(classifier, (tuple, list)) else classifier
    weight = state.get(f"{first}.weight")
    return int(weight.shape[0]) if weight is not None and weight.ndim >= 1 else None


def final_norm(encoder: nn.Module) -> nn.Module:
    """The encoder's last LayerNorm, wherever its layout keeps it (``norm``, or ``fc_norm`` for the
    global-average-pool layout, applied per token here)."""
    norm = getattr(encoder, "norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        return norm
    fc_norm = getattr(encoder, "fc_norm", None)
    return fc_norm if fc_norm is not None else nn.Identity()
