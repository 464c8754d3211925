"""A tap on token-reduction steps: which patch tokens a block kept, fused or merged.

Transforms that shrink the token sequence inside a block (EViT, ToMe) inherit :class:`TokenTapMixin`
and call :meth:`TokenTapMixin.emit_token_step` with a :class:`TokenStep` after their reduction, only
when someone listens (``has_token_taps``), so a plain forward pays nothing. Analyses collect the steps
with :func:`token_reduction_trace`, a context manager that registers a tap on every such block (found
by type) and removes them all on exit, also when the block raises: no state is left behind.

Indices in a step count *non-prefix* tokens only (prefix tokens: cls, dist, registers are never
reduced by these transforms and never appear here).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


@dataclass
class TokenStep:
    """One reduction inside one block, for a batch.

    ``kind``: ``"keep"`` (EViT-style: keep ``kept`` of the ``n_in`` input tokens, the others fused
    into one extra token appended last when ``fused``, else dropped) or ``"merge"`` (ToMe-style:
    input token ``i`` goes to output token ``dest[:, i]``).

    ``kept`` (B, k): indices of the kept input tokens, in their output order. ``scores`` (B, n_in):
    the score each input token was ranked by (EViT: the class token's attention, mean over heads).
    ``dest`` (B, n_in): output index of each input token. ``size`` (B, n_out): how many original
    patches each output token holds after the step. ``source`` (B, N0): output token holding each
    original patch, when the transform tracks it (ToMe does).
    """

    kind: str
    n_in: int
    n_out: int
    num_prefix: int
    kept: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    fused: bool = False
    dest: torch.Tensor | None = None
    size: torch.Tensor | None = None
    source: torch.Tensor | None = None


TokenTapFn = Callable[[TokenStep], None]


class TokenTapMixin:
    """For modules that reduce tokens: ``register_token_tap(fn)`` and ``emit_token_step(step)``."""

    def _token_taps_dict(self) -> OrderedDict:
        taps = self.__dict__.get("_token_taps")
        if taps is None:  # created lazily: works for modules built by __init__ or by copy
            taps = self.__dict__["_token_taps"] = OrderedDict()
        return taps

    def register_token_tap(self, fn: TokenTapFn) -> RemovableHandle:
        taps = self._token_taps_dict()
        handle = RemovableHandle(taps)
        taps[handle.id] = fn
        return handle

    @property
    def has_token_taps(self) -> bool:
        return bool(self.__dict__.get("_token_taps"))

    def emit_token_step(self, step: TokenStep) -> None:
        for fn in list(self._token_taps_dict().values()):
            fn(step)


def token_reduction_blocks(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(index in ``model.blocks``, block) of every token-reducing block (by type), in forward order."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        return []
    return [(i, b) for i, b in enumerate(blocks) if isinstance(b, TokenTapMixin)]


@contextlib.contextmanager
def token_reduction_trace(model: nn.Module) -> Iterator[list[tuple[int, TokenStep]]]:
    """Collect ``(block index, TokenStep)`` for every reduction run while inside the block.

    >>> with token_reduction_trace(model) as steps:
    ...     model(images)

    The taps are removed on exit, also when the block raises.
    """
    steps: list[tuple[int, TokenStep]] = []
    handles = []
    try:
        for i, blk in token_reduction_blocks(model):
            handles.append(blk.register_token_tap(lambda s, i=i: steps.append((i, s))))
        yield steps
    finally:
        for h in handles:
            h.remove()
