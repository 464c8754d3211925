"""ChangeViT: Zhu, Huang, Huang, Shao, Cheng, "ChangeViT: Unleashing Plain Vision Transformers for Change
Detection" (arXiv 2406.12847, 2024), after the official code (github.com/zhuduowang/ChangeViT @ feea28c).

Both dates go through the same networks (shared weights), each on its own:

- a plain ViT (any timm ViT here): its last block's normalised patch tokens as a map ``c5``;
- the **detail-capture** CNN: ResNet-18's stem (7x7 stride-2 conv, BN, ReLU; *no* max-pool) and its
  layers 1-3 (torchvision ``BasicBlock``), dropout 0.01 after layer 1: ``c2, c3, c4`` at strides 2, 4, 8;
- the **feature injector**: for each of c2, c3, c4 one cross-attention block whose queries are the ViT
  tokens and whose keys/values are all tokens of that CNN level (pre-LayerNorm on both, 8 heads, no qkv
  bias, no positional encoding; then an MLP, ratio 4, **ReLU**; two residuals); the three results are
  concatenated and fused by a 1x1 convolution into the new ``c5``.

The decoder models the difference at each level, ``f_l = block_l(cat[x_l, y_l, |x_l - y_l|])`` (1x1
conv to C/4, BN, ReLU, two 3x3 convs with ReLU, a 3x3 conv back to C; no bias), then goes top-down
(``c4f = f4 + up(f5)``, ``c3f = f3 + up(c4f)``, ``c2f = f2 + up(c3f)``; up = 1x1 conv + a 4x4 stride-2
transposed conv) and ends in a stride-2 transposed conv and a 3x3 conv to one change score per pixel.
Loss (:func:`bce_dice_loss`): BCE + 1 - Dice, the Dice one soft value over the whole batch (eps 1e-5).
Layer names follow the official code (``structure_enhance``, ``up_c5``, ``classfier``, ``mlp``), so
its decoder's state dict loads as is.

Differences from the official code, on purpose:
- Output: two channels ``[0, z]`` (z the pre-sigmoid score), so the change task's argmax and
  softmax read it like any two-class head: argmax is ``z > 0``, i.e. the official sigmoid > 0.5. The
  loss takes BCE on the logit (``binary_cross_entropy_with_logits``), the same function as the
  official BCE on ``sigmoid(z)`` without its log clamp.
- Geometry: the official model is fixed to 256 px, a 16 px patch and CNN widths 64/128/256. Here the
  widths are options (``detail_channels``) and any patch size works: where a top-down step's 2x
  transposed convolution does not land on the next level's size (a ViT patch other than 16 px), the
  result is resized bilinearly to it.
- Initialisation: the official rule (Kaiming for the decoder's direct convolutions, BN to 1/0; the
  transposed convolutions, difference blocks and injector keep PyTorch's default) is kept; the
  detail-capture CNN starts from torchvision's ResNet init, not ImageNet weights (nothing downloads).
- The official repo swaps the two dates when loading (``pre_img`` holds the later image); vitkit keeps
  them in order (A, B). The loss and F1 do not depend on the order; the difference blocks see
  ``cat[x, y, |x-y|]`` in input order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DETAIL_CHANNELS = (64, 128, 256)


# -- detail capture ------------------------------------------------------------------------------
class DetailCapture(nn.Module):
    """ResNet-18 stem + layers 1-3 without the max-pool: features at strides 2, 4 and 8."""

    def __init__(self, in_chans: int, channels: tuple[int, int, int] = DETAIL_CHANNELS, blocks: int = 2):
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        self.inplanes = channels[0]
        self.conv1 = nn.Conv2d(in_chans, channels[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._layer(BasicBlock, channels[0], blocks, 1)
        self.layer2 = self._layer(BasicBlock, channels[1], blocks, 2)
        self.layer3 = self._layer(BasicBlock, channels[2], blocks, 2)
        self.drop = nn.Dropout(p=0.01)
        for m in self.modules():  # torchvision's ResNet initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _layer(self, block: type, planes: int, blocks: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or self.inplanes != planes:
            down = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [block(self.inplanes, planes, stride, down)]
        self.inplanes = planes
        layers += [block(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        c2 = self.drop(self.layer1(x))
        c3 = self.layer2(c2)
        return [c2, c3, self.layer3(c3)]


# -- feature injector ------------------------------------------------------------------------------
class CrossAttention(nn.Module):
    """Queries from the ViT tokens, keys and values from the CNN tokens (official ``CrossAttention``)."""

    def __init__(self, dim: int, context_dim: int, num_heads: int = 8):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(context_dim, dim * 2, bias=False)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, n, h, c // h).transpose(1, 2)
        kv = self.kv(y).reshape(b, y.shape[1], 2, h, c // h).permute(2, 0, 3, 1, 4)
        attn = (q @ kv[0].transpose(-2, -1)) * self.scale
        out = (self.attn_drop(attn.softmax(-1)) @ kv[1]).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class InjectorBlock(nn.Module):
    """``x + CA(LN(x), LN(y))``, then ``x + MLP(LN(x))`` (official ``Block``)."""

    def __init__(self, dim: int, context_dim: int, num_heads: int = 8, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(context_dim)
        self.attn = CrossAttention(dim, context_dim, num_heads)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), self.norm2(y))
        return x + self.mlp(self.norm3(x))


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


class FeatureInjector(nn.Module):
    """The three CNN levels injected into the ViT map, fused by a 1x1 convolution."""

    def __init__(self, dim: int, context_dims: tuple[int, int, int], num_heads: int = 8):
        super().__init__()
        self.c2_c5 = InjectorBlock(dim, context_dims[0], num_heads)
        self.c3_c5 = InjectorBlock(dim, context_dims[1], num_heads)
        self.c4_c5 = InjectorBlock(dim, context_dims[2], num_heads)
        self.fuse = nn.Conv2d(dim * 3, dim, 1, bias=False)
        _official_init(self)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        c2, c3, c4, c5 = feats
        b, d, h, w = c5.shape
        q = _tokens(c5)
        maps = [
            blk(q, _tokens(c)).transpose(1, 2).reshape(b, d, h, w)
            for blk, c in ((self.c2_c5, c2), (self.c3_c5, c3), (self.c4_c5, c4))
        ]
        return self.fuse(torch.cat(maps, 1))


# -- decoder ---------------------------------------------------------------------------------------
def _official_init(module: nn.Module) -> None:
    """The official ``weight_init``: only direct children and children of direct ``Sequential`` s."""

    def leaf(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    for m in module.children():
        for g in m.children() if isinstance(m, nn.Sequential) else [m]:
            leaf(g)


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 1, bias=False),
        nn.ConvTranspose2d(cout, cout, kernel_size=4, stride=2, padding=1),
    )


def _difference_block(dim: int, decay: int = 4) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(dim * 3, dim // decay, 1, bias=False),
        nn.BatchNorm2d(dim // decay),
        nn.ReLU(),
        nn.Conv2d(dim // decay, dim // decay, 3, 1, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(dim // decay, dim // decay, 3, 1, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(dim // decay, dim, 3, 1, padding=1, bias=False),
    )


class ChangeDecoder(nn.Module):
    """Injector, difference modelling per level, top-down path, head: one change score per pixel."""

    def __init__(self, dims: tuple[int, int, int, int], num_heads: int = 8):
        super().__init__()
        c2, c3, c4, c5 = dims
        self.structure_enhance = FeatureInjector(c5, (c2, c3, c4), num_heads)
        self.up_c5 = _up(c5, c4)
        self.up_c4 = _up(c4, c3)
        self.up_c3 = _up(c3, c2)
        self.classfier = nn.Sequential(  # sic: the official name, so its weights load
            nn.ConvTranspose2d(c2, c2, kernel_size=4, stride=2, padding=1),
            nn.Conv2d(c2, 1, 3, 1, padding=1, bias=False),
        )
        self.mlp = nn.ModuleList(_difference_block(d) for d in dims)
        _official_init(self)

    def forward(self, fx: list[torch.Tensor], fy: list[torch.Tensor]) -> torch.Tensor:
        """``fx``, ``fy``: [c2, c3, c4, c5] of each date; returns the pre-sigmoid score (B, 1, h, w)."""
        fx = [*fx[:3], self.structure_enhance(fx)]
        fy = [*fy[:3], self.structure_enhance(fy)]
        f = [blk(torch.cat([x, y, (x - y).abs()], 1)) for blk, x, y in zip(self.mlp, fx, fy)]
        c4 = f[2] + _fit(self.up_c5(f[3]), f[2])
        c3 = f[1] + _fit(self.up_c4(c4), f[1])
        c2 = f[0] + _fit(self.up_c3(c3), f[0])
        return self.classfier(c2)


def _fit(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinear resize to ``like``'s size where a 2x step does not land on it (patch != 16 px)."""
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def bce_dice_loss(z: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """The official loss, BCE + 1 - Dice, on the pre-sigmoid score ``z`` (B, H, W) and the change mask
    (B, H, W) (pixels marked ``ignore_index`` left out of both terms). The Dice is one soft value over
    the whole batch: ``(2 sum p t + 1e-5) / (sum p + sum t + 1e-5)``."""
    valid = target != ignore_index
    t = (target == 1).float()
    z = z.float()
    bce = F.binary_cross_entropy_with_logits(z[valid], t[valid])
    p = torch.sigmoid(z) * valid
    t = t * valid
    eps = 1e-5
    dice = (2 * (p * t).sum() + eps) / (p.sum() + t.sum() + eps)
    return bce + 1 - dice
