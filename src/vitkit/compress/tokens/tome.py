"""ToMe — Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023.

Changes the model: every timm ``Block`` becomes a :class:`ToMeBlock` that, between the attention
residual and the MLP, merges the ``r`` most similar pairs of patch tokens (bipartite soft matching on
the attention keys averaged over heads) into their size-weighted average, and adds ``log(size)`` to
the attention logits of later blocks (proportional attention).

Identical to the official code (facebookresearch/ToMe @main, ``tome/merge.py`` and
``tome/patch/timm.py``) in the matching (sets A/B alternate over the whole sequence, prefix tokens
protected by -inf scores), the output order (prefix first, kept A tokens re-sorted by position, then
B), the size-weighted merge, proportional attention and the clamping of ``r`` (to half the
unprotected tokens, with a warning here); tests/compress/test_tokens.py runs a copy of the official
merge and block on the same weights (logits within 1e-5). Differences on purpose, none of which
changes the outputs:

* the block forward keeps LayerScale (``ls1``/``ls2``), q/k-norm and the fused attention kernel
  (the official patch re-implements old timm attention and drops them); the keys come from the
  attention tap (``needs_probs=False``) and ``log(size)`` from an additive attention-bias hook;
* every block takes and returns a plain tensor, like timm's ``Block`` (so ``forward_intermediates``,
  feature taps and quantization calibration see tokens): the token sizes and the source map are
  per-forward state in a :class:`ToMeState` the model's ToMe blocks share, filed under the very
  tensor a block returned and read by the block that receives that tensor. Unlike the official
  ``_tome_info`` dict nothing is reset at the start of a forward, so concurrent or nested forwards
  do not see each other's sizes, and a block called on its own (on any other tensor) starts from
  unmerged tokens (size 1);
* every prefix token (cls, dist, registers: ``model.num_prefix_tokens``) is protected, the
  official code's cls / dist rule extended to registers, which stay in front too;
* pooling stays size-weighted for every ``global_pool`` other than ``'token'``: the last block
  "unmerges" (each original patch takes its merged token's value), so mean/max/attention pooling
  over the original N tokens equals size-weighted pooling over the merged ones (the official code
  does this only in its MAE patch);
* merging uses one ``scatter_add`` per tensor (ONNX ``ScatterElements`` with ``add``, opset >= 16)
  rather than ``scatter_reduce``, which ONNX cannot export (the same sums, in another order).

Source tracing for visualization: every block reports its matching, the token sizes and the
original-patch → token map to :func:`vitkit.models.token_reduction_trace` listeners (``vitkit
attention`` draws them). Not implemented: the ``(r, inflection)`` schedule (an explicit per-block
list covers it).
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from timm.models.vision_transformer import Block
from torch import nn

from vitkit.compress._blocks import WrappedBlock, refuse_attention_mask, transformer_blocks
from vitkit.errors import VitkitError
from vitkit.models import TokenStep, TokenTapMixin, num_prefix_tokens, record_transform
from vitkit.registry import AS_IS, Technique, register

MergeFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int = 0) -> tuple[MergeFn, torch.Tensor]:
    """ToMe's matching on ``metric`` (B, N, D) of the whole token sequence, the first ``protected``
    being prefix tokens (cls, dist, registers); returns ``(merge, dest)``.

    As the official ``tome/merge.py``: tokens alternate into sets A (even positions) and B (odd)
    over the whole sequence; protected A tokens match nothing and no A token may pick a protected B
    token (their scores are -inf); each A token picks its most similar B token (cosine); the ``r``
    best-matched A tokens are merged into their B partners. Output order: the prefix tokens in
    their places, then the kept A tokens (re-sorted by position when there is a prefix, in score
    order when there is none, as the official code), then the B tokens; for one or two prefix tokens
    (cls, cls + dist) exactly the official order, and more (registers) stay in front the same way.
    ``dest`` (B, N) is the index of the output token each input token ends up in (N - r outputs).
    ``merge(x, size)`` returns the size-weighted averages and the summed sizes (the official
    ``merge_wavg``). The matching itself is not differentiated.
    """
    B, N, _ = metric.shape
    P = int(protected)
    n_a, n_b = (N + 1) // 2, N // 2
    if not 0 <= r <= (N - P) // 2:
        raise VitkitError(
            f"ToMe: cannot merge r={r} pairs among {N - P} patch tokens (at most {(N - P) // 2})"
        )
    pa, pb = (P + 1) // 2, P // 2  # prefix tokens in A (even positions < P) and in B (odd ones)
    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True)
        a, b = m[:, ::2], m[:, 1::2]
        scores = a @ b.transpose(-1, -2)  # (B, n_a, n_b)
        scores[:, :pa, :] = -math.inf
        scores[:, :, :pb] = -math.inf
        node_max, node_idx = scores.max(dim=-1)  # best B partner of each A token
        edge_idx = node_max.argsort(dim=-1, descending=True)
        src_idx, unm_idx = edge_idx[:, :r], edge_idx[:, r:]  # A tokens merged / kept
        if P:  # the prefix A tokens (never merged) come first
            unm_idx = unm_idx.sort(dim=-1).values
        dst_idx = node_idx.gather(1, src_idx)
        n_unm = n_a - r
        dev = metric.device
        j = torch.arange(n_unm, device=dev)
        # kept A token j-th in unm_idx -> its own position if a prefix token, else after the prefix
        out_a = torch.where(j < pa, 2 * unm_idx, P + j - pa) if pa else (P + j).expand(B, -1)
        k = torch.arange(n_b, device=dev)
        dest_b = torch.where(k < pb, 2 * k + 1, P + (n_unm - pa) + k - pb).expand(B, -1)
        dest_a = torch.zeros(B, n_a, dtype=torch.long, device=dev)
        dest_a = dest_a.scatter(1, unm_idx, out_a.expand(B, -1))
        dest_a = dest_a.scatter(1, src_idx, dest_b.gather(1, dst_idx))
        dest = torch.zeros(B, N, dtype=torch.long, device=dev)
        dest[:, 0::2], dest[:, 1::2] = dest_a, dest_b
    n_out = N - r

    def merge(x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        C = x.shape[-1]
        total = x.new_zeros(B, n_out, C).scatter_add(1, dest[..., None].expand(-1, -1, C), x * size)
        new_size = size.new_zeros(B, n_out, 1).scatter_add(1, dest[..., None], size)
        return total / new_size, new_size

    return merge, dest


class ToMeState:
    """Per-forward merge state of one model's ToMe blocks, filed under the tokens it belongs to.

    For a token tensor a ToMe block returned: the size of each patch token (B, Np, 1) and, for every
    original patch, the index of the merged token that holds it (B, N0). The next block looks its
    input up (:meth:`take`); an input no block returned (the patch embedding's output, a block called
    on its own) has no entry, i.e. every token has size 1. Entries are keyed by the tensor's
    identity and dropped when that tensor is freed (a weak reference), so nothing outlives a
    forward and two forwards never share an entry. A deep copy (timm's EMA, export preparation)
    starts empty, and nothing here is saved (no parameters, no buffers).
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, torch.Tensor, torch.Tensor]] = {}

    def put(self, tokens: torch.Tensor, size: torch.Tensor, source: torch.Tensor) -> None:
        key, entries = id(tokens), self._entries
        ref = weakref.ref(tokens, lambda _ref: entries.pop(key, None))
        entries[key] = (ref, size, source)

    def take(self, tokens: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        entry = self._entries.get(id(tokens))
        if entry is None or entry[0]() is not tokens:  # an id can be reused once its tensor is gone
            return None, None
        return entry[1], entry[2]

    def __len__(self) -> int:
        return len(self._entries)

    def __deepcopy__(self, memo: dict) -> ToMeState:
        return ToMeState()

    def __getstate__(self) -> dict:  # torch.save of a whole model: per-forward state is not kept
        return {}

    def __setstate__(self, state: dict) -> None:
        self._entries = {}


class ToMeBlock(TokenTapMixin, WrappedBlock):
    """A timm ``Block`` that merges ``r`` token pairs after its attention residual (see module doc).

    Takes and returns tokens (B, N, C); the sizes of the tokens it receives come from ``state``
    (shared by the model's ToMe blocks). The model's last block returns tokens unmerged to the
    original count when ``unmerge``.
    """

    def __init__(
        self,
        block: Block,
        r: int,
        num_prefix: int,
        prop_attn: bool = True,
        last: bool = False,
        unmerge: bool = False,
        state: ToMeState | None = None,
    ):
        super().__init__(block)
        self.r = int(r)
        self.num_prefix = int(num_prefix)
        self.prop_attn = bool(prop_attn)
        self.last = bool(last)
        self.unmerge = bool(unmerge)
        self.merge_state = state if state is not None else ToMeState()  # a plain attribute: not in state_dict

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        size, source = self.merge_state.take(x)
        if self.r > 0 or size is not None:
            refuse_attention_mask(attn_mask, is_causal, "ToMe block", "it merges tokens")
        P = self.num_prefix
        keys: list[torch.Tensor] = []
        handles = []
        # Hooks are registered for this call only and closed over local state: re-entrant.
        if self.r > 0:
            handles.append(self.attn.register_tap(lambda s: keys.append(s.k), needs_probs=False))
        if self.prop_attn and size is not None:
            log_size = torch.cat([size.new_zeros(size.shape[0], P, 1), size.log()], dim=1)
            bias = log_size[:, None, None, :, 0]  # (B, 1, 1, N): added to the logits of key j
            handles.append(self.attn.register_attn_bias(lambda m, q, k: bias))
        try:
            x = self.attention_residual(x, attn_mask, is_causal)
        finally:
            for h in handles:
                h.remove()

        if self.r > 0:
            metric = keys[0].mean(dim=1)  # keys averaged over heads, the whole sequence (official)
            merge, dest_all = bipartite_soft_matching(metric, self.r, protected=P)
            if size is None:
                size = x.new_ones(x.shape[0], x.shape[1] - P, 1)
            x, size_all = merge(x, torch.cat([size.new_ones(size.shape[0], P, 1), size], dim=1))
            size = size_all[:, P:]
            dest = dest_all[:, P:] - P  # patch token -> merged patch token (prefix tokens stay in place)
            source = dest if source is None else dest.gather(1, source)
            if self.has_token_taps:  # for visualization: which original patches share a token
                n_in = dest.shape[1]
                step = TokenStep("merge", n_in, n_in - self.r, P, dest=dest, size=size[..., 0], source=source)
                self.emit_token_step(step)

        x = self.mlp_residual(x)
        if not self.last:
            if size is not None:
                self.merge_state.put(x, size, source)
            return x
        if self.unmerge and source is not None:
            C = x.shape[-1]
            patches = x[:, P:].gather(1, source[..., None].expand(-1, -1, C))
            x = torch.cat([x[:, :P], patches], dim=1)
        return x

    def extra_repr(self) -> str:
        return f"r={self.r}, num_prefix={self.num_prefix}, prop_attn={self.prop_attn}, last={self.last}"


@dataclass
class ToMeConfig:
    """``r``: pairs merged per block, one int for every block or a list with one entry per block.
    ``prop_attn``: proportional attention (ToMe's default; the paper turns it off only for MAE)."""

    r: int | list[int] = 8
    prop_attn: bool = True
    schedule: list[int] = field(default_factory=list)  # resolved per-block r (filled by apply_tome)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_r(r: int | Sequence[int], depth: int) -> list[int]:
    if isinstance(r, bool):
        raise VitkitError(f"ToMe r: expected an integer or a list of {depth} integers, got {r!r}")
    if isinstance(r, int):
        sched = [r] * depth
    else:
        sched = [int(v) for v in r]
        if len(sched) != depth:
            raise VitkitError(
                f"ToMe r: a per-block list needs {depth} entries (one per block), got {len(sched)}"
            )
    if any(v < 0 for v in sched):
        raise VitkitError(f"ToMe r must be >= 0, got {sched}")
    return sched


def _patch_tokens(model: nn.Module) -> int:
    pe = getattr(model, "patch_embed", None)
    n = getattr(pe, "num_patches", None)
    if not n:
        raise VitkitError(f"ToMe: cannot tell how many patch tokens {type(model).__name__} has")
    return int(n)


def apply_tome(model: nn.Module, cfg: ToMeConfig | dict | None = None) -> nn.Module:
    """Turn every block of a timm ViT into a :class:`ToMeBlock` (in place); records ``tome``."""
    cfg = ToMeConfig(**cfg) if isinstance(cfg, dict) else (cfg or ToMeConfig())
    blocks = transformer_blocks(model, "ToMe")
    sched = resolve_r(cfg.r, len(blocks))
    n = _patch_tokens(model)
    clamped = []
    for i, r in enumerate(sched):
        if r > n // 2:  # the official code clamps r to half the unprotected tokens, block by block
            clamped.append(f"block {i}: {r} -> {n // 2}")
            sched[i] = r = n // 2
        n -= r
    if clamped:
        warnings.warn(
            f"ToMe r clamped to half the patch tokens left (as the official code does): {', '.join(clamped)}",
            stacklevel=2,
        )
    P = num_prefix_tokens(model)
    unmerge = getattr(model, "global_pool", "token") != "token"
    state = ToMeState()  # one per model: its blocks hand token sizes on through it
    for i, (blk, r) in enumerate(zip(list(blocks), sched)):
        last = i == len(blocks) - 1
        blocks[i] = ToMeBlock(blk, r, P, cfg.prop_attn, last=last, unmerge=unmerge, state=state)
    cfg.schedule = sched
    record_transform(model, "tome", cfg.to_dict())
    return model


def replay_tome(model: nn.Module, config: dict) -> nn.Module:
    config = dict(config)
    schedule = config.pop("schedule", None)
    if schedule:
        config["r"] = schedule
    return apply_tome(model, ToMeConfig(**config))


register(
    Technique(
        name="tome",
        summary="merge the r most similar token pairs in every block (bipartite soft matching)",
        paper='Bolya et al., "Token Merging: Your ViT But Faster" (2023)',
        config=ToMeConfig,
        replay=replay_tome,
        export=AS_IS,
        family="compress",
        verb="vitkit reduce-tokens RUN --method tome --r 2",
    )
)
