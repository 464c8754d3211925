# ruff: noqa  -- a line-by-line transcription of the official code, kept in its own style for comparison
"""Reference re-implementation of the *official* ChangeViT logic (CPU, tiny sizes).

Source: github.com/zhuduowang/ChangeViT, HEAD feea28c ("Update data_aug", 2024-12-19).
Written to follow the official code line by line, parameterised by channel sizes,
no einops / mmcv / CUDA / downloads, no hard-coded 256.

What mirrors what (official file : lines):

* ``DetailCapture``        model/encoder.py:357-370 (+ model/resnet.py:30-59 BasicBlock,
                           101-133 ResNet.__init__/_make_layer).  ResNet18 conv1(7x7,s2)+bn1+relu,
                           NO maxpool, layer1 (+Dropout p=0.01), layer2 (s2), layer3 (s2).
                           Widths (64,128,256) and stem width 64 are parameters here.
* ``Mlp``                  model/decoder.py:39-57   (fc1 -> act -> drop -> fc2 -> drop)
* ``CrossAttention``       model/decoder.py:59-91   (q from ViT tokens, kv from CNN tokens)
* ``InjectorBlock``        model/decoder.py:94-109  (class ``Block``: pre-LN cross-attn + MLP, 2 residuals)
* ``FeatureInjector``      model/decoder.py:112-151 (3 independent blocks c2/c3/c4 -> c5, concat, 1x1 fuse)
* ``Decoder``              model/decoder.py:154-218 (difference modelling ``mlp[i]``, top-down ``up_c*``,
                           ``classfier`` head, sigmoid)
* ``official_weight_init`` model/utils.py:8-41      (only direct children / children of direct Sequentials)
* ``bce_dice_loss``        model/utils.py:51-58     (BCE on probabilities + batch-level soft Dice, eps 1e-5)
* ``confuse_matrix`` / ``cm2score``   model/metric_tool.py:112-131, 88-109 (dataset-level confusion matrix)
* ``adjust_learning_rate`` model/utils.py:67-81     (poly 0.9 + 200-iter linear warm-up from 0.1*lr)
* ``official_pos_embed``   model/encoder.py:175-201 (DINOv2 interpolate_pos_encoding; with no cls token
                           ``npatch = N-1 != N`` so the bicubic resample *always* runs, scale (g+0.1)/g)

The only generalisation vs. the official code: ``FeatureInjector`` in the official ``Decoder`` is built
as ``FeatureInjector(dim1=c5_channel)`` so its ``dim2`` is the hard-coded default ``[64, 128, 256]``;
here ``Decoder`` passes ``dim2=in_dim[:3]`` (identical for the official Trainer, where in_dim[:3] is
[64, 128, 256]).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------------
# helpers replacing einops.rearrange
# --------------------------------------------------------------------------------------------------
def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    """rearrange(x, 'b c h w -> b (h w) c')"""
    return x.flatten(2).transpose(1, 2)


def _to_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """rearrange(x, 'b (h w) c -> b c h w', h=h, w=w)"""
    b, n, c = x.shape
    assert n == h * w
    return x.transpose(1, 2).reshape(b, c, h, w)


# --------------------------------------------------------------------------------------------------
# model/utils.py:8-41  weight_init (note: NOT recursive; ConvTranspose2d is not an nn.Conv2d)
# --------------------------------------------------------------------------------------------------
def _init_leaf(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.ones_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def official_weight_init(module: nn.Module) -> None:
    for _, m in module.named_children():
        if isinstance(m, nn.Sequential):
            for _, g in m.named_children():
                _init_leaf(g)
        else:
            _init_leaf(m)  # ModuleList / custom modules: untouched (default PyTorch init)


# --------------------------------------------------------------------------------------------------
# Detail-capture CNN: model/encoder.py:357-370, model/resnet.py BasicBlock / _make_layer
# --------------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        return self.relu(out)


class DetailCapture(nn.Module):
    """ResNet18 stem + layer1..3, no maxpool -> features at strides 2, 4, 8.

    Official: widths=(64,128,256), stem=64, ImageNet-pretrained resnet18 (strict=False), layer4/fc/maxpool
    exist in the official module but are unused.  Same module (shared weights) for both dates.
    """

    def __init__(self, in_chans=3, stem=64, widths=(64, 128, 256), blocks=(2, 2, 2), drop=0.01):
        super().__init__()
        self.inplanes = stem
        self.conv1 = nn.Conv2d(in_chans, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(widths[0], blocks[0], stride=1)
        self.layer2 = self._make_layer(widths[1], blocks[1], stride=2)
        self.layer3 = self._make_layer(widths[2], blocks[2], stride=2)
        self.drop = nn.Dropout(p=drop)  # encoder.py:358, applied to layer1's output only
        # torchvision-style init (model/resnet.py has no custom init; the official weights are pretrained)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        for _ in range(1, blocks):
            layers.append(BasicBlock(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x):  # encoder.py:361-370 detail_capture
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x2 = self.drop(self.layer1(x))  # stride 2  (no maxpool!)
        x3 = self.layer2(x2)  # stride 4
        x4 = self.layer3(x3)  # stride 8
        return [x2, x3, x4]


# --------------------------------------------------------------------------------------------------
# ViT positional-embedding quirk: model/encoder.py:175-209
# --------------------------------------------------------------------------------------------------
def official_pos_embed(
    pos_embed: torch.Tensor, w: int, h: int, patch_size: int, offset: float = 0.1, antialias: bool = False
) -> torch.Tensor:
    """What the official DinoVisionTransformer actually adds to the patch tokens.

    The model has no cls token, but interpolate_pos_encoding computes ``npatch = x.shape[1] - 1`` so
    ``npatch == N`` is never true and the learned (N, D) table is always bicubically resampled with
    scale ``(w//p + 0.1)/sqrt(N)``, giving a grid of the same size (for 256 px, p=16: 16 -> 16) but a
    slightly shifted/smoothed table.  Linear and fixed, so it is only a re-parameterisation of a
    pos_embed that the official code trains from scratch (the checkpoint's pos_embed is deleted).
    """
    previous_dtype = pos_embed.dtype
    N, dim = pos_embed.shape[1], pos_embed.shape[-1]
    w0, h0 = w // patch_size + offset, h // patch_size + offset
    sqrt_N = math.sqrt(N)
    sx, sy = float(w0) / sqrt_N, float(h0) / sqrt_N
    pe = F.interpolate(
        pos_embed.float().reshape(1, int(sqrt_N), int(sqrt_N), dim).permute(0, 3, 1, 2),
        scale_factor=(sx, sy),
        mode="bicubic",
        antialias=antialias,
    )
    assert int(w0) == pe.shape[-2] and int(h0) == pe.shape[-1]
    return pe.permute(0, 2, 3, 1).reshape(1, -1, dim).to(previous_dtype)


# --------------------------------------------------------------------------------------------------
# Feature injector: model/decoder.py:39-151
# --------------------------------------------------------------------------------------------------
class Mlp(nn.Module):  # decoder.py:39-57
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        x = self.drop(x)
        return x


class CrossAttention(nn.Module):  # decoder.py:59-91
    def __init__(self, dim1, dim2, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim1 // num_heads
        self.scale = head_dim**-0.5
        self.q = nn.Linear(dim1, dim1, bias=qkv_bias)
        self.kv = nn.Linear(dim2, dim1 * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim1, dim1)  # bias=True
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, y):
        B1, N1, C1 = x.shape
        B2, N2, C2 = y.shape
        q = self.q(x).reshape(B1, N1, self.num_heads, C1 // self.num_heads).permute(0, 2, 1, 3)
        kv = self.kv(y).reshape(B2, N2, 2, self.num_heads, C1 // self.num_heads).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B1, N1, C1)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class InjectorBlock(nn.Module):  # decoder.py:94-109 (class Block)
    def __init__(
        self,
        dim1,
        dim2,
        num_heads,
        mlp_ratio=4.0,
        qkv_bias=False,
        drop=0.0,
        attn_drop=0.0,
        drop_path=0.0,
        act_layer=nn.GELU,
        norm_layer=nn.LayerNorm,
    ):
        super().__init__()
        assert drop_path == 0.0, "official default is 0 (DropPath omitted here)"
        self.norm1 = norm_layer(dim1)
        self.norm2 = norm_layer(dim2)
        self.attn = CrossAttention(
            dim1, dim2, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop
        )
        self.drop_path = nn.Identity()
        self.norm3 = norm_layer(dim1)
        self.mlp = Mlp(
            in_features=dim1, hidden_features=int(dim1 * mlp_ratio), act_layer=act_layer, drop=drop
        )

    def forward(self, x, y):
        x = x + self.drop_path(self.attn(self.norm1(x), self.norm2(y)))
        x = x + self.drop_path(self.mlp(self.norm3(x)))
        return x


class FeatureInjector(nn.Module):  # decoder.py:112-151
    """Defaults are the official ones: 8 heads, mlp_ratio 4, qkv_bias False, ReLU (!), nn.LayerNorm (eps 1e-5)."""

    def __init__(
        self,
        dim1=384,
        dim2=(64, 128, 256),
        num_heads=8,
        mlp_ratio=4.0,
        qkv_bias=False,
        drop=0.0,
        attn_drop=0.0,
        drop_path=0.0,
        act_layer=nn.ReLU,
        norm_layer=nn.LayerNorm,
    ):
        super().__init__()
        args = (num_heads, mlp_ratio, qkv_bias, drop, attn_drop, drop_path, act_layer, norm_layer)
        self.c2_c5 = InjectorBlock(dim1, dim2[0], *args)
        self.c3_c5 = InjectorBlock(dim1, dim2[1], *args)
        self.c4_c5 = InjectorBlock(dim1, dim2[2], *args)
        self.fuse = nn.Conv2d(dim1 * 3, dim1, 1, bias=False)
        official_weight_init(self)  # decoder.py:123 -> only self.fuse is re-initialised (kaiming)

    def base_forward(self, c2, c3, c4, c5):
        H, W = c5.shape[2:]
        c2, c3, c4, c5 = _to_tokens(c2), _to_tokens(c3), _to_tokens(c4), _to_tokens(c5)
        _c2 = _to_map(self.c2_c5(c5, c2), H, W)  # query: ViT tokens, key/value: CNN tokens
        _c3 = _to_map(self.c3_c5(c5, c3), H, W)
        _c4 = _to_map(self.c4_c5(c5, c4), H, W)
        return self.fuse(torch.cat([_c2, _c3, _c4], dim=1))

    def forward(self, fx, fy):
        return self.base_forward(*fx), self.base_forward(*fy)


# --------------------------------------------------------------------------------------------------
# Decoder: model/decoder.py:154-218
# --------------------------------------------------------------------------------------------------
class Decoder(nn.Module):
    def __init__(self, in_dim=(64, 128, 256, 384), decay=4, num_class=1, num_heads=8, official_init=True):
        super().__init__()
        c2_channel, c3_channel, c4_channel, c5_channel = in_dim
        self.structure_enhance = FeatureInjector(dim1=c5_channel, dim2=list(in_dim[:3]), num_heads=num_heads)
        self.up_c5 = nn.Sequential(
            nn.Conv2d(c5_channel, c4_channel, 1, bias=False),
            nn.ConvTranspose2d(c4_channel, c4_channel, kernel_size=4, stride=2, padding=1),
        )
        self.up_c4 = nn.Sequential(
            nn.Conv2d(c4_channel, c3_channel, 1, bias=False),
            nn.ConvTranspose2d(c3_channel, c3_channel, kernel_size=4, stride=2, padding=1),
        )
        self.up_c3 = nn.Sequential(
            nn.Conv2d(c3_channel, c2_channel, 1, bias=False),
            nn.ConvTranspose2d(c2_channel, c2_channel, kernel_size=4, stride=2, padding=1),
        )
        self.classfier = nn.Sequential(  # (sic) official spelling
            nn.ConvTranspose2d(c2_channel, c2_channel, kernel_size=4, stride=2, padding=1),
            nn.Conv2d(c2_channel, num_class, 3, 1, padding=1, bias=False),
        )
        self.mlp = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(dim * 3, dim // decay, 1, bias=False),
                    nn.BatchNorm2d(dim // decay),
                    nn.ReLU(),
                    nn.Conv2d(dim // decay, dim // decay, 3, 1, padding=1, bias=False),
                    nn.ReLU(),
                    nn.Conv2d(dim // decay, dim // decay, 3, 1, padding=1, bias=False),
                    nn.ReLU(),
                    nn.Conv2d(dim // decay, dim, 3, 1, padding=1, bias=False),
                )
                for dim in in_dim
            ]
        )
        if official_init:  # model/trainer.py:23 weight_init(self.decoder)
            official_weight_init(self)

    @staticmethod
    def difference_modeling(x, y, block):
        f = torch.cat([x, y, torch.abs(x - y)], dim=1)
        return block(f)

    def forward(self, fx, fy):
        """fx, fy: [c2, c3, c4, c5] per date; c2..c4 from DetailCapture, c5 = ViT tokens as (B, D, h, w)."""
        c2x, c3x, c4x = fx[:-1]
        c2y, c3y, c4y = fy[:-1]
        c5x, c5y = self.structure_enhance(fx, fy)  # raw ViT map is replaced by the injected one
        c2 = self.difference_modeling(c2x, c2y, self.mlp[0])
        c3 = self.difference_modeling(c3x, c3y, self.mlp[1])
        c4 = self.difference_modeling(c4x, c4y, self.mlp[2])
        c5 = self.difference_modeling(c5x, c5y, self.mlp[3])
        c4f = c4 + self.up_c5(c5)
        c3f = c3 + self.up_c4(c4f)
        c2f = c2 + self.up_c3(c3f)
        pred = self.classfier(c2f)
        return torch.sigmoid(pred)  # probabilities, not logits


# --------------------------------------------------------------------------------------------------
# Loss: model/utils.py:51-58
# --------------------------------------------------------------------------------------------------
def bce_dice_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """inputs: sigmoid probabilities (B,1,H,W); targets: float {0,1} (B,1,H,W)."""
    bce = F.binary_cross_entropy(inputs, targets)  # mean over every pixel of the batch
    inter = (inputs * targets).sum()  # whole-batch sums (one Dice for the batch)
    eps = 1e-5
    dice = (2 * inter + eps) / (inputs.sum() + targets.sum() + eps)
    return bce + 1 - dice


# --------------------------------------------------------------------------------------------------
# Metric: model/metric_tool.py (confusion matrix summed over the whole test set)
# --------------------------------------------------------------------------------------------------
def confuse_matrix(gts: np.ndarray, preds: np.ndarray, num_classes: int = 2) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes))
    for lt, lp in zip(gts, preds):
        lt, lp = lt.flatten(), lp.flatten()
        mask = (lt >= 0) & (lt < num_classes)
        cm += np.bincount(num_classes * lt[mask].astype(int) + lp[mask], minlength=num_classes**2).reshape(
            num_classes, num_classes
        )
    return cm  # rows = gt, cols = pred


def cm2score(hist: np.ndarray) -> dict:
    e = np.finfo(np.float32).eps
    tp, fn, fp, tn = hist[1, 1], hist[1, 0], hist[0, 1], hist[0, 0]
    oa = (tp + tn) / (tp + fn + fp + tn + e)
    recall = tp / (tp + fn + e)
    precision = tp / (tp + fp + e)
    f1 = 2 * recall * precision / (recall + precision + e)
    iou = tp / (tp + fp + fn + e)
    pre = ((tp + fn) * (tp + fp) + (tn + fp) * (tn + fn)) / (tp + fp + tn + fn) ** 2
    kappa = (oa - pre) / (1 - pre)
    return {"Kappa": kappa, "IoU": iou, "F1": f1, "OA": oa, "recall": recall, "precision": precision}


def predict_mask(prob: torch.Tensor) -> torch.Tensor:  # main.py:55 / :108
    return torch.where(prob > 0.5, torch.ones_like(prob), torch.zeros_like(prob)).long()


# --------------------------------------------------------------------------------------------------
# LR schedule: model/utils.py:67-81 (lr_mode='poly' default), called every iteration
# --------------------------------------------------------------------------------------------------
def adjust_learning_rate(base_lr, epoch, it, max_batches, max_epochs, lr_mode="poly", step_loss=100):
    if lr_mode == "step":
        lr = base_lr * (0.1 ** (epoch // step_loss))
    else:
        lr = base_lr * (1 - it * 1.0 / (max_batches * max_epochs)) ** 0.9
    if epoch == 0 and it < 200:
        lr = base_lr * 0.9 * (it + 1) / 200 + 0.1 * base_lr
    return lr
