"""The one unfused attention module every vitkit technique shares.

It replaces timm's ``Attention`` by type (never by patching ``forward``) and is numerically identical
to it: same parameters under the same names (so state dicts load both ways), q/k-norm, the scale
norm, the output gate and masks kept. It exposes named points:

* ``qk_matmul``, ``softmax``, ``av_matmul``: submodules a quantizer can wrap or replace by type;
* ``register_attn_bias(fn)``: an additive bias on the attention logits (Gaussian-mixture masks,
  ToMe's proportional attention, ...); ``fn(module, q, k) -> bias`` broadcastable to (B, H, N, N);
* ``register_logit_hook(fn)``: any other edit of the logits (temperature, multiplicative masks);
  ``fn(module, logits) -> logits``;
* ``register_tap(fn, needs_probs=True)``: hands an :class:`AttentionState` (q, k, v and, when asked
  for, the post-softmax probabilities) to whoever asked (EViT scoring, ToMe metric, attention maps).

With nothing attached (or only an additive bias) it runs ``F.scaled_dot_product_attention``, so the
swap costs nothing at inference.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from torch import nn
from torch.utils.hooks import RemovableHandle

BiasFn = Callable[["VitkitAttention", torch.Tensor, torch.Tensor], torch.Tensor | None]
LogitFn = Callable[["VitkitAttention", torch.Tensor], torch.Tensor]
TapFn = Callable[["AttentionState"], None]


class MatMul(nn.Module):
    """``a @ b`` as a module, so that quantizers can find and wrap the two attention matmuls."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b


class Softmax(nn.Module):
    """Softmax over the key axis, as a module (post-softmax quantizers replace it)."""

    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.softmax(dim=self.dim)


@dataclass
class AttentionState:
    """What a tap receives: per-head tensors of shape (B, H, N, D); ``probs`` is (B, H, N, N)."""

    module: VitkitAttention
    q: torch.Tensor  # after q_norm, before scaling
    k: torch.Tensor  # after k_norm
    v: torch.Tensor
    probs: torch.Tensor | None  # post-softmax, before attention dropout; None when not asked for


class VitkitAttention(nn.Module):
    """Drop-in replacement for ``timm.layers.Attention`` with hook points (see module docstring)."""

    def __init__(self, source: TimmAttention):
        super().__init__()
        self.num_heads = source.num_heads
        self.head_dim = source.head_dim
        self.attn_dim = getattr(source, "attn_dim", source.num_heads * source.head_dim)
        self.scale = source.scale
        # The same submodules, under the same names: state dicts stay interchangeable with timm.
        self.qkv = source.qkv
        self.q_norm = source.q_norm
        self.k_norm = source.k_norm
        self.attn_drop = source.attn_drop
        self.norm = getattr(source, "norm", nn.Identity())
        self.gate = getattr(source, "gate", None)
        self.proj = source.proj
        self.proj_drop = source.proj_drop
        self.qk_matmul = MatMul()
        self.softmax = Softmax(dim=-1)
        self.av_matmul = MatMul()
        self.force_unfused = False
        self._bias_hooks: OrderedDict[int, BiasFn] = OrderedDict()
        self._logit_hooks: OrderedDict[int, LogitFn] = OrderedDict()
        self._taps: OrderedDict[int, tuple[TapFn, bool]] = OrderedDict()

    # -- hook registration -------------------------------------------------------------------
    def register_attn_bias(self, fn: BiasFn) -> RemovableHandle:
        handle = RemovableHandle(self._bias_hooks)
        self._bias_hooks[handle.id] = fn
        return handle

    def register_logit_hook(self, fn: LogitFn) -> RemovableHandle:
        handle = RemovableHandle(self._logit_hooks)
        self._logit_hooks[handle.id] = fn
        return handle

    def register_tap(self, fn: TapFn, needs_probs: bool = True) -> RemovableHandle:
        handle = RemovableHandle(self._taps)
        self._taps[handle.id] = (fn, needs_probs)
        return handle

    @property
    def uses_sdpa(self) -> bool:
        """True when the fused kernel can run: no probability tap, logit hook or replaced op."""
        return not (
            self.force_unfused
            or self._logit_hooks
            or any(needs for _, needs in self._taps.values())
            or type(self.qk_matmul) is not MatMul
            or type(self.softmax) is not Softmax
            or type(self.av_matmul) is not MatMul
        )

    # -- forward ------------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)

        bias = _mask_to_bias(attn_mask, is_causal, N, q)
        for fn in self._bias_hooks.values():
            extra = fn(self, q, k)
            if extra is not None:
                bias = extra if bias is None else bias + extra

        if self.uses_sdpa:
            if self._taps:
                state = AttentionState(self, q, k, v, None)
                for fn, _ in self._taps.values():
                    fn(state)
            if bias is not None:
                bias = bias.to(q.dtype)
                while bias.ndim < 2:  # SDPA wants at least (L, S); hooks may return broadcastable vectors
                    bias = bias.unsqueeze(0)
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        else:
            attn = self.qk_matmul(q * self.scale, k.transpose(-2, -1))
            if bias is not None:
                attn = attn + bias
            for fn in self._logit_hooks.values():
                attn = fn(self, attn)
            attn = self.softmax(attn)
            if self._taps:
                state = AttentionState(self, q, k, v, attn)
                for fn, _ in self._taps.values():
                    fn(state)
            attn = self.attn_drop(attn)
            x = self.av_matmul(attn, v)

        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        return self.proj_drop(x)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}"


def _mask_to_bias(
    attn_mask: torch.Tensor | None, is_causal: bool, n: int, like: torch.Tensor
) -> torch.Tensor | None:
    # Same semantics as SDPA / timm's resolve_self_attn_mask: bool masks mark allowed positions.
    if is_causal:
        return torch.full((n, n), float("-inf"), dtype=like.dtype, device=like.device).triu_(1)
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        bias = torch.zeros(attn_mask.shape, dtype=like.dtype, device=like.device)
        return bias.masked_fill_(~attn_mask, float("-inf"))
    return attn_mask


# -- model-level helpers ----------------------------------------------------------------------
def use_vitkit_attention(model: nn.Module) -> nn.Module:
    """Replace every timm ``Attention`` (exact type) in ``model`` by :class:`VitkitAttention`, in place.

    Subclasses and other attention types (RoPE, EVA, ...) are left alone: their forward differs and
    copying it here would be a silent fork. Returns the model.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is TimmAttention:
                new = VitkitAttention(child)
                new.train(child.training)
                setattr(parent, name, new)
    return model


def attention_modules(model: nn.Module) -> list[VitkitAttention]:
    """The model's :class:`VitkitAttention` modules in forward (block) order."""
    return [m for m in model.modules() if isinstance(m, VitkitAttention)]


def _select(model: nn.Module, layers: int | Sequence[int] | None) -> dict[int, VitkitAttention]:
    mods = attention_modules(model)
    if not mods:
        from timm.models.vision_transformer import Attention

        from vitkit.errors import VitkitError

        if not any(type(m) is Attention for m in model.modules()):  # e.g. TiC's window mixer, Hyena
            raise VitkitError(
                f"{type(model).__name__} has no token-to-token softmax attention that vitkit can hook "
                "(its token mixer is not timm's Attention)"
            )
        raise VitkitError(
            f"{type(model).__name__} has no vitkit attention modules: create it with vitkit.create_model "
            "or call vitkit.models.use_vitkit_attention(model) first"
        )
    if layers is None:
        return dict(enumerate(mods))
    idx = [layers] if isinstance(layers, int) else list(layers)
    out = {}
    for i in idx:
        j = i if i >= 0 else len(mods) + i
        if not 0 <= j < len(mods):
            from vitkit.errors import VitkitError

            raise VitkitError(f"attention layer {i} does not exist: the model has {len(mods)} layers")
        out[j] = mods[j]
    return out


class AttentionMaps:
    """Probabilities collected by :func:`attention_maps`: ``maps[layer]`` is (B, H, N, N)."""

    def __init__(self, layers: Iterable[int]):
        self._chunks: dict[int, list[torch.Tensor]] = {i: [] for i in layers}

    def _add(self, layer: int, probs: torch.Tensor) -> None:
        self._chunks[layer].append(probs.detach().float().cpu())

    @property
    def layers(self) -> list[int]:
        return sorted(self._chunks)

    def __getitem__(self, layer: int) -> torch.Tensor:
        chunks = self._chunks[layer]
        if not chunks:
            raise KeyError(f"no attention recorded for layer {layer}: run the model inside the context")
        return torch.cat(chunks) if len(chunks) > 1 else chunks[0]

    def __contains__(self, layer: int) -> bool:
        return layer in self._chunks and bool(self._chunks[layer])

    def items(self) -> Iterator[tuple[int, torch.Tensor]]:
        for i in self.layers:
            if i in self:
                yield i, self[i]


@contextlib.contextmanager
def attention_maps(model: nn.Module, layers: int | Sequence[int] | None = None) -> Iterator[AttentionMaps]:
    """Record post-softmax attention of the chosen layers (all by default) while inside the block.

    >>> with attention_maps(model, layers=[-1]) as maps:
    ...     model(images)
    >>> maps[len(vitkit.models.attention_modules(model)) - 1].shape  # (B, heads, tokens, tokens)

    The hooks are removed on exit, also when the block raises.
    """
    selected = _select(model, layers)
    maps = AttentionMaps(selected)
    handles = []
    try:
        for i, mod in selected.items():
            handles.append(mod.register_tap(lambda s, i=i: maps._add(i, s.probs), needs_probs=True))
        yield maps
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def logit_hook(model: nn.Module, fn: LogitFn, layers: int | Sequence[int] | None = None) -> Iterator[None]:
    """Apply ``fn`` to the attention logits of the chosen layers inside the block (e.g. temperature)."""
    handles = [m.register_logit_hook(fn) for m in _select(model, layers).values()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
