"""MAE: "Masked Autoencoders Are Scalable Vision Learners" (He et al., CVPR 2022).

What it changes: wraps any timm ViT encoder in :class:`MaskedAutoencoder`, which hides a random 75%
of the patches per sample, encodes only the visible ones and reconstructs the hidden ones with a
light decoder; :class:`MAEObjective` plugs that loss into vitkit's one training loop.

Faithful to facebookresearch/mae (``models_mae.py``): per-sample random masking by ``argsort`` of
uniform noise (``len_keep = int(L * (1 - r))``), the encoder sees visible patches plus *all* prefix
tokens (cls, registers; ``encoder.num_prefix_tokens``), a decoder ``Linear(D -> Dd)`` + mask tokens
+ fixed 2-D sin-cos position embedding (regenerated for the model's grid, zeros for the prefix) +
timm ``Block`` s + ``LayerNorm`` + ``Linear(Dd -> p*p*C)``; the loss is the per-patch mean squared
error averaged over *masked* patches only, with ``norm_pix_loss`` normalising each target patch by
its mean and unbiased variance. Initialisation as MAE: xavier-uniform linears (the patch projection
viewed as a matrix), zero biases, ``normal(0.02)`` cls and mask tokens, and (from scratch) a fixed
sin-cos encoder position embedding.

Our choices (say so where they differ):
* The encoder is a plain timm ``VisionTransformer``: its own ``patch_embed``, ``_pos_embed`` (so
  cls/register tokens and ``no_embed_class`` layouts are handled by timm's own rule), ``norm_pre``,
  ``blocks`` and final norm are called in order; masking happens after the position embedding,
  which equals MAE's "add pos-embed, then mask" because the embedding is added per token. timm's
  ``patch_drop`` is skipped (masking replaces it).
* The encoder is built in the fine-tuning layout (``global_pool='avg'``, ``fc_norm=True``): the final
  LayerNorm lives in ``fc_norm`` and is applied per token during pretraining, so the saved encoder
  loads into ``timm.create_model(name, global_pool='avg', fc_norm=True)`` with no key mapping. (MAE
  deletes ``norm`` and trains a fresh ``fc_norm`` when fine-tuning; we keep the pretrained affine.)
* timm's ``build_sincos2d_pos_embed`` orders the sin/cos halves differently from MAE's numpy
  version (a fixed permutation of the channels; equivalent as a fixed embedding).
* Decoder defaults are light for small models: width = the encoder's (capped at 512), 2 blocks
  (the medical MAE recipe's depth; MAE's ViT-B default is 512 wide, 8 deep), 32-dim heads.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from vitkit.data import BatchTransform, ImageDataset
from vitkit.errors import VitkitError
from vitkit.models import final_norm
from vitkit.registry import parse_config
from vitkit.train.evaluate import autocast_context
from vitkit.train.objectives import Objective, ObjectiveOutput


class MAEConfig(BaseModel):
    """The MAE model and loss. Loop settings (epochs, lr, crop scale) live in ``TrainConfig``."""

    model_config = ConfigDict(extra="forbid")

    mask_ratio: float = Field(0.75, gt=0, lt=1, description="fraction of patches hidden per sample")
    decoder_dim: int | None = Field(None, gt=0, description="decoder width [default: encoder's, ≤ 512]")
    decoder_depth: int = Field(2, ge=1, description="decoder blocks")
    decoder_heads: int | None = Field(None, gt=0, description="decoder heads [default: width // 32]")
    decoder_mlp_ratio: float = Field(4.0, gt=0)
    norm_pix_loss: bool = Field(True, description="normalise each target patch (mean 0, var 1)")
    fixed_pos_embed: bool = Field(
        True, description="from scratch: fixed 2-D sin-cos encoder position embedding (MAE)"
    )

    @field_validator("decoder_dim")
    @classmethod
    def _multiple_of_4(cls, v: int | None) -> int | None:
        if v is not None and v % 4:
            raise ValueError(f"must be a multiple of 4 for the 2-D sin-cos embedding, got {v}")
        return v

    @classmethod
    def build(cls, source: str = "mae", **values: Any) -> MAEConfig:
        """Validate ``values`` (None means default); errors become one-line ``VitkitError`` s."""
        return parse_config(cls, values, source)

    def build_model(self, encoder: nn.Module, *, init_encoder: bool = False) -> MaskedAutoencoder:
        """The autoencoder these settings describe, around ``encoder``."""
        return MaskedAutoencoder(encoder, self, init_encoder=init_encoder)


# -- pure functions -------------------------------------------------------------------------------
def patchify(imgs: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, ph*pw*C), patches in row-major grid order, channel innermost (MAE)."""
    ph, pw = patch_size
    n, c, h, w = imgs.shape
    if h % ph or w % pw:
        raise ValueError(f"image {h}x{w} is not divisible by the patch size {ph}x{pw}")
    gh, gw = h // ph, w // pw
    x = imgs.reshape(n, c, gh, ph, gw, pw)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, gh * gw, ph * pw * c)


def unpatchify(x: torch.Tensor, patch_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """The exact inverse of :func:`patchify`: (N, L, ph*pw*C) -> (N, C, H, W)."""
    ph, pw = patch_size
    gh, gw = grid
    n, length, d = x.shape
    c = d // (ph * pw)
    if length != gh * gw or c * ph * pw != d:
        raise ValueError(f"cannot unpatchify {tuple(x.shape)} with patch {ph}x{pw} and grid {gh}x{gw}")
    x = x.reshape(n, gh, gw, ph, pw, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, c, gh * ph, gw * pw)


def random_masking(
    x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by sorting uniform noise (MAE).

    Args:
        x: (N, L, D) patch tokens (no prefix tokens).
    Returns:
        ``x_visible`` (N, len_keep, D) with ``len_keep = int(L * (1 - mask_ratio))``; ``mask`` (N, L),
        1 for hidden and 0 for visible patches in the original order; ``ids_restore`` (N, L), the
        permutation that undoes the shuffle.
    """
    n, length, d = x.shape
    len_keep = int(length * (1 - mask_ratio))
    noise = torch.rand(n, length, generator=generator, device="cpu" if generator else x.device)
    noise = noise.to(x.device)
    ids_shuffle = torch.argsort(noise, dim=1)  # small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    mask = torch.ones(n, length, device=x.device, dtype=x.dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_visible, mask, ids_restore


def masked_patch_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool
) -> torch.Tensor:
    """Mean over masked patches of the per-patch mean squared error (MAE's ``forward_loss``)."""
    if norm_pix_loss:
        target = normalize_patches(target)
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def normalize_patches(target: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Each patch to mean 0 and variance 1, with MAE's epsilon 1e-6 (MAE: the unbiased variance;
    Hi-End-MAE's ``LayerNorm`` target: the biased one)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True, unbiased=unbiased)
    return (target - mean) / (var + 1.0e-6) ** 0.5


def sincos_pos_embed(grid: tuple[int, int], dim: int, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding (1, prefix + gh*gw, dim) with zero rows for the prefix tokens."""
    pe = build_sincos2d_pos_embed(list(grid), dim=dim)
    return torch.cat([torch.zeros(num_prefix_tokens, dim), pe], dim=0).unsqueeze(0)


# -- the model -----------------------------------------------------------------------------------
def _require(encoder: nn.Module, name: str, what: str) -> Any:
    value = getattr(encoder, name, None)
    if value is None:
        raise VitkitError(
            f"MAE needs a timm VisionTransformer-style encoder; {type(encoder).__name__} has no `{name}` ({what})"
        )
    return value


class MaskedAutoencoder(nn.Module):
    """A timm ViT encoder plus MAE's light decoder. ``forward(imgs) -> (loss, pred, mask)``."""

    # the decoder's LayerNorm: eps 1e-6 as facebookresearch/mae's builders (and timm's Block default)
    norm_layer: Any = partial(nn.LayerNorm, eps=1e-6)
    # ``norm_pix_loss`` normalises each target patch with the unbiased variance (MAE)
    unbiased_target_var: bool = True

    def __init__(self, encoder: nn.Module, cfg: MAEConfig | None = None, *, init_encoder: bool = False):
        super().__init__()
        cfg = cfg or MAEConfig()
        self.cfg = cfg
        patch_embed = _require(encoder, "patch_embed", "the patch embedding")
        _require(encoder, "blocks", "the transformer blocks")
        if not hasattr(encoder, "_pos_embed"):
            raise VitkitError(
                f"MAE needs a timm VisionTransformer-style encoder; {type(encoder).__name__} has no `_pos_embed`"
            )
        proj = getattr(patch_embed, "proj", None)
        if not isinstance(proj, nn.Conv2d):
            raise VitkitError(
                f"MAE needs a convolutional patch embedding (patch_embed.proj Conv2d); got {type(proj).__name__}"
            )
        self.encoder = encoder
        self.patch_size: tuple[int, int] = tuple(patch_embed.patch_size)  # type: ignore[assignment]
        self.grid: tuple[int, int] = tuple(patch_embed.grid_size)  # type: ignore[assignment]
        self.in_chans = proj.in_channels
        self.num_prefix_tokens = int(getattr(encoder, "num_prefix_tokens", 0))
        # The loop reads the input size and normalization from here.
        self.pretrained_cfg = dict(getattr(encoder, "pretrained_cfg", {}) or {})

        embed_dim = int(encoder.embed_dim)
        dec_dim = cfg.decoder_dim or min(512, embed_dim - embed_dim % 4)
        heads = cfg.decoder_heads or max(1, dec_dim // 32)
        if dec_dim % heads:
            raise VitkitError(f"mae: decoder_dim {dec_dim} is not divisible by decoder_heads {heads}")
        self.decoder_embed = nn.Linear(embed_dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.register_buffer(
            "decoder_pos_embed",
            sincos_pos_embed(self.grid, dec_dim, self.num_prefix_tokens),
            persistent=False,  # regenerated for the grid; not a learned value
        )
        self.decoder_blocks = nn.ModuleList(
            Block(dec_dim, heads, cfg.decoder_mlp_ratio, qkv_bias=True, norm_layer=self.norm_layer)
            for _ in range(cfg.decoder_depth)
        )
        self._build_decoder_extras(embed_dim, dec_dim, heads)
        self.decoder_norm = self.norm_layer(dec_dim)
        ph, pw = self.patch_size
        self.decoder_pred = nn.Linear(dec_dim, ph * pw * self.in_chans)
        self._init_decoder()
        if init_encoder:
            mae_init_encoder(encoder, fixed_pos_embed=cfg.fixed_pos_embed)

    def _build_decoder_extras(self, embed_dim: int, dec_dim: int, heads: int) -> None:
        """Decoder modules a variant adds (Hi-End-MAE's cross-attention blocks); MAE has none."""

    @property
    def patch_embed(self) -> nn.Module:
        return self.encoder.patch_embed

    def decoder_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the encoder (to continue pretraining later, e.g. ExPLoRA)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}

    def decoder_modules(self) -> list[nn.Module]:
        """Every decoder module (initialised by MAE's rule)."""
        return [self.decoder_embed, self.decoder_pred, *self.decoder_blocks, self.decoder_norm]

    def _init_decoder(self) -> None:
        for m in self.decoder_modules():
            m.apply(_mae_init_module)
        nn.init.normal_(self.mask_token, std=0.02)

    # -- forward pieces (MAE's forward_encoder / forward_decoder / forward_loss) -------------------
    def forward_encoder(
        self,
        imgs: torch.Tensor,
        mask_ratio: float,
        generator: torch.Generator | None = None,
        hidden: dict[int, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches: (latent incl. prefix tokens, mask, ids_restore). ``hidden``,
        when given, is filled with ``{i: output of block i}`` (0-based, before the final norm) for
        the indices it already holds as keys."""
        enc = self.encoder
        x = enc.patch_embed(imgs)
        x = enc._pos_embed(x)  # timm's own rule for cls/register tokens and their position embedding
        n = self.num_prefix_tokens
        prefix, patches = x[:, :n], x[:, n:]
        patches, mask, ids_restore = random_masking(patches, mask_ratio, generator)
        x = torch.cat([prefix, patches], dim=1)
        x = enc.norm_pre(x)
        for i, blk in enumerate(enc.blocks):
            x = blk(x)
            if hidden is not None and i in hidden:
                hidden[i] = x
        x = final_norm(enc)(x)
        return x, mask, ids_restore

    def hidden_to_keep(self) -> dict[int, Any] | None:
        """The encoder blocks whose outputs the decoder reads (keys of the dict ``forward_encoder``
        fills); MAE reads the final output only."""
        return None

    def forward_decoder(
        self, x: torch.Tensor, ids_restore: torch.Tensor, hidden: dict[int, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Predicted patches (N, L, p*p*C) in grid order; ``hidden`` is unused by MAE."""
        x = self.decoder_tokens(x, ids_restore)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_head(x)

    def decoder_tokens(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """The decoder's input: the visible tokens projected, mask tokens in the hidden places, back in
        grid order, plus the decoder position embedding (prefix tokens first)."""
        x = self.decoder_embed(x)
        n = self.num_prefix_tokens
        b, length = ids_restore.shape
        visible = x[:, n:]
        masks = self.mask_token.expand(b, length - visible.shape[1], -1).to(x.dtype)
        patches = torch.cat([visible, masks], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return torch.cat([x[:, :n], patches], dim=1) + self.decoder_pos_embed.to(x.dtype)

    def decoder_head(self, x: torch.Tensor) -> torch.Tensor:
        """Norm and per-patch prediction, the prefix tokens dropped."""
        return self.decoder_pred(self.decoder_norm(x))[:, self.num_prefix_tokens :]

    def target_patches(self, imgs: torch.Tensor) -> torch.Tensor:
        """What the decoder predicts: the patches, each normalised when ``norm_pix_loss``."""
        target = patchify(imgs, self.patch_size)
        return normalize_patches(target, self.unbiased_target_var) if self.cfg.norm_pix_loss else target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_patch_loss(pred, self.target_patches(imgs), mask, norm_pix_loss=False)

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        hidden = self.hidden_to_keep()
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, generator, hidden=hidden)
        pred = self.forward_decoder(latent, ids_restore, hidden)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def reconstruct(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Predicted patches back to image space (undoing ``norm_pix_loss`` with each patch's own
        statistics, as MAE's visualisation does)."""
        if self.cfg.norm_pix_loss:
            target = patchify(imgs, self.patch_size)
            mean = target.mean(-1, keepdim=True)
            std = (target.var(-1, keepdim=True, unbiased=self.unbiased_target_var) + 1.0e-6) ** 0.5
            pred = pred * std + mean
        return unpatchify(pred, self.patch_size, self.grid)


def _mae_init_module(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def mae_init_encoder(encoder: nn.Module, fixed_pos_embed: bool = True) -> None:
    """MAE's initialisation of a fresh encoder (``models_mae.initialize_weights``)."""
    with torch.no_grad():
        encoder.apply(_mae_init_module)
        w = encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for name in ("cls_token", "reg_token"):
            tok = getattr(encoder, name, None)
            if tok is not None:
                nn.init.normal_(tok, std=0.02)
        pos = getattr(encoder, "pos_embed", None)
        if fixed_pos_embed and pos is not None and pos.shape[-1] % 4 == 0:
            prefix = 0 if getattr(encoder, "no_embed_class", False) else encoder.num_prefix_tokens
            pos.copy_(sincos_pos_embed(tuple(encoder.patch_embed.grid_size), pos.shape[-1], prefix))
            pos.requires_grad_(False)


# -- the objective -------------------------------------------------------------------------------
class MAEObjective(Objective):
    """MAE's reconstruction loss in the one loop. ``model`` is a :class:`MaskedAutoencoder` (or its
    DDP wrapper). Validation reports the masked-patch loss next to the predict-the-mean baseline."""

    task = "none"

    def __init__(self, val_seed: int = 0):
        self.val_seed = val_seed

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> ObjectiveOutput:
        loss, _, _ = model(images)
        return ObjectiveOutput(loss)

    @torch.no_grad()
    def validate(
        self,
        model: nn.Module,
        val_data: ImageDataset,
        transform: BatchTransform,
        device: torch.device,
        precision: str,
        batch_size: int,
    ) -> dict[str, float]:
        m = evaluate_reconstruction(
            model, val_data, transform, device=device, precision=precision, batch_size=batch_size
        )
        return {f"val_{k}": v for k, v in m.items()}

    def describe(self) -> dict:
        return {"name": "mae"}


@torch.no_grad()
def evaluate_reconstruction(
    model: MaskedAutoencoder,
    data: ImageDataset,
    transform: BatchTransform,
    *,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, float]:
    """Masked-patch loss on ``data`` with fixed masks (seeded), next to two predict-the-mean baselines
    on the same masks: ``mean_baseline`` predicts every hidden patch by the mean target patch of
    ``data`` (for ``norm_pix_loss`` that is ≈ predicting zeros, loss ≈ 1), ``position_mean_baseline``
    by the mean target at its grid position (stronger). Both means are taken over ``data`` itself
    (in-sample, hence optimistic). ``loss_ratio`` = loss / mean_baseline."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    targets, masks, losses, weights = [], [], [], []
    try:
        for i in range(0, len(data), batch_size):
            x = transform.images(data.images[i : i + batch_size]).to(device)
            with autocast_context(device, precision):
                loss, _, mask = model(x, generator=g)
            targets.append(model.target_patches(x).float())
            masks.append(mask.float())
            losses.append(float(loss) * float(mask.sum()))
            weights.append(float(mask.sum()))
    finally:
        model.train(was_training)
    target = torch.cat(targets)
    mask = torch.cat(masks)
    global_mean = target.mean(dim=(0, 1), keepdim=True).expand_as(target)
    position_mean = target.mean(dim=0, keepdim=True).expand_as(target)
    baseline = masked_patch_loss(global_mean, target, mask, norm_pix_loss=False).item()
    position = masked_patch_loss(position_mean, target, mask, norm_pix_loss=False).item()
    loss = sum(losses) / max(sum(weights), 1.0)
    return {
        "loss": loss,
        "mean_baseline": baseline,
        "position_mean_baseline": position,
        "loss_ratio": loss / baseline if baseline else math.nan,
    }
