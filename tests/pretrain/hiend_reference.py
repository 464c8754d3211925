"""A small re-implementation of the official Hi-End-MAE forward (FengheTan9/Hi-End-MAE@b0df9c6,
``hi_end_mae.py: HiEndMAE.forward`` and ``networks/vit.py: MAEViTEncoder / MAEViTDecoder /
CrossAttentionBlock``), in 2-D, written from plain tensor ops on a state dict so that it shares no
code with ``vitkit.pretrain.hiend``.

What it keeps of the official logic, on purpose:
* tokens stay in the *shuffled* order throughout the decoder: ``[cls, visible..., mask tokens...]``;
  the decoder position embedding is gathered in shuffled order and added to all but the cls token;
* each tapped encoder layer (``hidden_states_out[i]``, the output of block ``i``, un-normed) goes
  through its own ``encoder_to_decoder`` linear and is the key/value of one cross-attention block;
* attention is ``softmax(q k^T * scale) v`` written out (the official fallback path);
* the loss is ``MSELoss(pred[:, -msk_length:], LayerNorm(no affine, eps=1e-6)(masked patches))``.

The only adaptation: 2-D patches (``[ph, pw, c]`` per patch, MAE's order) and the encoder's own
position embedding (timm's) instead of the official 3-D sin-cos one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _ln(x: torch.Tensor, sd: dict[str, torch.Tensor], key: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{key}.weight"], sd[f"{key}.bias"], eps)


def _lin(x: torch.Tensor, sd: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    return F.linear(x, sd[f"{key}.weight"], sd.get(f"{key}.bias"))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = q.shape
    m = k.shape[1]
    q = q.reshape(b, n, heads, c // heads).permute(0, 2, 1, 3)
    k = k.reshape(b, m, heads, c // heads).permute(0, 2, 1, 3)
    v = v.reshape(b, m, heads, c // heads).permute(0, 2, 1, 3)
    attn = (q @ k.transpose(-2, -1)) * (c // heads) ** -0.5
    return (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)


def _self_attention(x: torch.Tensor, sd: dict[str, torch.Tensor], key: str, heads: int) -> torch.Tensor:
    q, k, v = _lin(x, sd, f"{key}.qkv").chunk(3, dim=-1)
    return _lin(_attend(q, k, v, heads), sd, f"{key}.proj")


def _mlp(x: torch.Tensor, sd: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    return _lin(F.gelu(_lin(x, sd, f"{key}.fc1")), sd, f"{key}.fc2")


def _block(x: torch.Tensor, sd: dict[str, torch.Tensor], key: str, heads: int, eps: float) -> torch.Tensor:
    x = x + _self_attention(_ln(x, sd, f"{key}.norm1", eps), sd, f"{key}.attn", heads)
    return x + _mlp(_ln(x, sd, f"{key}.norm2", eps), sd, f"{key}.mlp")


def _cross_block(
    x: torch.Tensor, y: torch.Tensor, sd: dict[str, torch.Tensor], key: str, heads: int
) -> torch.Tensor:
    x = x + _self_attention(_ln(x, sd, f"{key}.norm0", 1e-6), sd, f"{key}.self_attn", heads)
    h = _ln(x, sd, f"{key}.norm1", 1e-6)
    k, v = _lin(y, sd, f"{key}.cross_attn.kv").chunk(2, dim=-1)
    x = x + _lin(_attend(_lin(h, sd, f"{key}.cross_attn.q"), k, v, heads), sd, f"{key}.cross_attn.proj")
    return x + _mlp(_ln(x, sd, f"{key}.norm2", 1e-6), sd, f"{key}.mlp")


def official_forward(
    sd: dict[str, torch.Tensor],
    imgs: torch.Tensor,
    shuffle_indices: torch.Tensor,
    *,
    patch: int,
    mask_ratio: float,
    enc_depth: int,
    enc_heads: int,
    dec_heads: int,
    self_depth: int,
    levels: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, all_x) as the official forward computes them; ``all_x`` (B, 1 + L, p*p*C) in the
    shuffled order. ``sd``: a vitkit ``HiEndMAE`` state dict (the names are only a way to find the
    weights); an encoder with one cls token and timm's position embedding ``pos_embed`` (1, 1+L, D)."""
    b, c, hh, ww = imgs.shape
    gh, gw = hh // patch, ww // patch
    length = gh * gw
    # patchify_image: [B, L, ph*pw*C]
    x = imgs.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 3, 5, 1).reshape(b, length, -1)
    out_chans = x.shape[-1]
    sel_length = int(length * (1 - mask_ratio))
    msk_length = length - sel_length
    shuffled_x = x.gather(1, shuffle_indices[:, :, None].expand(-1, -1, out_chans))
    msk_x = shuffled_x[:, -msk_length:]
    sel_indices = shuffle_indices[:, :sel_length]

    # encoder on the selected patches (conv patch embedding == a linear map of each patch)
    tokens = F.conv2d(
        imgs, sd["encoder.patch_embed.proj.weight"], sd["encoder.patch_embed.proj.bias"], stride=patch
    )
    tokens = tokens.flatten(2).transpose(1, 2)
    dim = tokens.shape[-1]
    pos = sd["encoder.pos_embed"]
    tokens = tokens + pos[:, 1:]
    sel = tokens.gather(1, sel_indices[:, :, None].expand(-1, -1, dim))
    cls = (sd["encoder.cls_token"] + pos[:, :1]).expand(b, -1, -1)
    h = torch.cat([cls, sel], dim=1)
    hidden_states_out = []
    for i in range(enc_depth):
        h = _block(h, sd, f"encoder.blocks.{i}", enc_heads, 1e-6)
        hidden_states_out.append(h)
    # the official encoder's final norm (timm's global-average-pool layout keeps it as fc_norm)
    sel_x = _ln(h, sd, "encoder.norm" if "encoder.norm.weight" in sd else "encoder.fc_norm", 1e-6)

    # encoder_to_decoder: the final output plus mask tokens, in the shuffled order
    dec_dim = sd["mask_token"].shape[-1]
    all_x = torch.cat([_lin(sel_x, sd, "decoder_embed"), sd["mask_token"].expand(b, msk_length, -1)], dim=1)
    dpe = sd["decoder_pos_embed"][:, 1:].expand(b, -1, -1)
    all_x = all_x.clone()
    all_x[:, 1:, :] += dpe.gather(1, shuffle_indices[:, :, None].expand(-1, -1, dec_dim))
    keys = [_lin(hidden_states_out[lv], sd, f"level_embed.{j}") for j, lv in enumerate(levels)]

    # decoder.forward_features
    for i in range(self_depth):
        all_x = _block(all_x, sd, f"decoder_blocks.{i}", dec_heads, 1e-6)
    for j, y in enumerate(keys):
        all_x = _cross_block(all_x, y, sd, f"cross_blocks.{j}", dec_heads)
    all_x = _lin(_ln(all_x, sd, "decoder_norm", 1e-6), sd, "decoder_pred")

    target = F.layer_norm(msk_x, (out_chans,), eps=1e-6)
    loss = F.mse_loss(all_x[:, -msk_length:], target)
    return loss, all_x
