# ruff: noqa  -- a line-by-line transcription of the official code, kept in its own style for comparison
"""Pure-PyTorch, CPU-runnable reference re-implementation of ViT-CoMer (Xia et al., CVPR 2024).

Follows the official code line by line: github.com/Traffic-X/ViT-CoMer @ b57f386 (segmentation/ variant).
No mmcv / mmseg / timm / CUDA ops. Sizes are parameters so that it runs on tiny inputs.

Mapping (official file : lines  ->  object here)
  detection/ops/functions/ms_deform_attn_func.py : 49-71  ms_deform_attn_core_pytorch -> ms_deform_attn_core_pytorch
      (segmentation/ has no ops/ folder; `from ops.modules import MSDeformAttn` resolves to the built detection/ops)
      the CUDA kernel it stands for: detection/ops/src/cuda/ms_deform_im2col_cuda.cuh : 281-290
      (h_im = loc_h*H - 0.5, w_im = loc_w*W - 0.5, zero outside) -> `_ms_deform_attn_naive` (test only)
  detection/ops/modules/ms_deform_attn.py : 28-130  MSDeformAttn                    -> MSDeformAttn
                                            64-81   MSDeformAttn._reset_parameters  -> MSDeformAttn._reset_parameters
                                            83-130  MSDeformAttn.forward            -> MSDeformAttn.forward
  segmentation/mmseg_custom/models/backbones/comer_modules.py
       13-25   get_reference_points    -> get_reference_points
       28-47   deform_inputs           -> deform_inputs         (computed in ViTCoMer.forward but NEVER used)
       50-63   deform_inputs_only_one  -> deform_inputs_only_one (what CTIBlock/CTI_toC/Extractor_CTI really use)
       66-85   ConvFFN                 -> ConvFFN
       88-107  MRFP                    -> MRFP
      110-125  DWConv                  -> DWConv
      128-179  MultiDWConv             -> MultiDWConv
      181-217  MultiscaleExtractor     -> MultiscaleExtractor
      220-271  CTI_toC                 -> CTI_toC
      273-324  Extractor_CTI           -> Extractor_CTI
      328-366  CTI_toV                 -> CTI_toV
      369-432  CTIBlock                -> CTIBlock
      435-487  CNN                     -> CNN  (SyncBatchNorm -> norm_layer, default BatchNorm2d; `stem_pool` added)
  segmentation/mmseg_custom/models/backbones/base/vit.py
       39-61   PatchEmbed, 64-88 Attention, 209-248 Block (layer_scale gamma1/gamma2 = ones),
      251-317  TIMMVisionTransformer.__init__ (norm_layer LayerNorm eps 1e-6, dpr = linspace(0, dpr, depth))
                                       -> PatchEmbed, Attention, Mlp, Block (the ViT stand-in)
  segmentation/mmseg_custom/models/backbones/vit_comer.py
       19-66   ViTCoMer.__init__, 68-81 _init_weights, 83-88 _get_pos_embed, 90-92 _init_deform_weights,
       94-98   _add_level_embed, 100-144 forward   -> ViTCoMerRef

Deliberate deviations (all flagged `# DEVIATION` below):
  * SyncBatchNorm (CNN stem/convs, ViTCoMer.norm1..4) -> nn.BatchNorm2d (same maths on one process).
  * CNN(stem_pool=...) : official stem = conv s2 + maxpool s2 -> c1..c4 at 1/4..1/32, which matches ViT patch 16
    (c3 at 1/16 == token grid). For patch 8 set stem_pool=False (MaxPool -> Identity) so c1..c4 = 1/2..1/16 and c3
    again equals the token grid. ViTCoMerRef does this automatically (stem_pool = patch_size == 16).
  * _get_pos_embed: official reshapes to pretrain_size // 16; here pretrain_size // patch_size.
  * with_cp (activation checkpointing) is not implemented (it does not change the maths).
  * ms_deform_attn_core_pytorch takes spatial shapes as a tensor and converts to python ints.
Everything else (including the odd bits: double GELU in MRFP, double LayerNorm in CTI_toC, unused
deform_inputs1/2, N // 21 split) is kept as in the official code.
"""

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.init import constant_, normal_, trunc_normal_, xavier_uniform_


# ----------------------------------------------------------------------------------------------
# helpers (timm DropPath)
# ----------------------------------------------------------------------------------------------
class DropPath(nn.Module):
    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep


# ----------------------------------------------------------------------------------------------
# (a) multi-scale deformable attention (ms_deform_attn_func.py 49-71, ms_deform_attn.py 28-130)
# ----------------------------------------------------------------------------------------------
def ms_deform_attn_core_pytorch(value, value_spatial_shapes, sampling_locations, attention_weights):
    """value [N, S, M, Dh]; shapes [L, 2] (H, W); sampling_locations [N, Lq, M, L, P, 2] in [0,1] (x, y);
    attention_weights [N, Lq, M, L, P].  Returns [N, Lq, M*Dh]."""
    if torch.is_tensor(value_spatial_shapes):
        value_spatial_shapes = [(int(h), int(w)) for h, w in value_spatial_shapes.tolist()]
    N_, S_, M_, D_ = value.shape
    _, Lq_, M_, L_, P_, _ = sampling_locations.shape
    value_list = value.split([H_ * W_ for H_, W_ in value_spatial_shapes], dim=1)
    sampling_grids = 2 * sampling_locations - 1
    sampling_value_list = []
    for lid_, (H_, W_) in enumerate(value_spatial_shapes):
        # N_, H_*W_, M_, D_ -> N_*M_, D_, H_, W_
        value_l_ = value_list[lid_].flatten(2).transpose(1, 2).reshape(N_ * M_, D_, H_, W_)
        # N_, Lq_, M_, P_, 2 -> N_*M_, Lq_, P_, 2
        sampling_grid_l_ = sampling_grids[:, :, :, lid_].transpose(1, 2).flatten(0, 1)
        # N_*M_, D_, Lq_, P_
        sampling_value_l_ = F.grid_sample(
            value_l_, sampling_grid_l_, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        sampling_value_list.append(sampling_value_l_)
    # (N_, Lq_, M_, L_, P_) -> (N_*M_, 1, Lq_, L_*P_)
    attention_weights = attention_weights.transpose(1, 2).reshape(N_ * M_, 1, Lq_, L_ * P_)
    output = (
        (torch.stack(sampling_value_list, dim=-2).flatten(-2) * attention_weights)
        .sum(-1)
        .view(N_, M_ * D_, Lq_)
    )
    return output.transpose(1, 2).contiguous()


def _ms_deform_attn_naive(value, shapes, loc, attw):
    """Slow loop mirroring the CUDA kernel (ms_deform_im2col_cuda.cuh 281-290): h_im = y*H - 0.5,
    w_im = x*W - 0.5, sample only if -1 < h_im < H and -1 < w_im < W, bilinear with zero outside. Test only."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    out = value.new_zeros(N, Lq, M, D)
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    for n in range(N):
        for q in range(Lq):
            for m in range(M):
                for l, (H, W) in enumerate(shapes):
                    v = value[n, starts[l] : starts[l] + H * W, m].view(H, W, D)
                    for p in range(P):
                        x, y = loc[n, q, m, l, p].tolist()
                        h_im, w_im = y * H - 0.5, x * W - 0.5
                        if not (h_im > -1 and w_im > -1 and h_im < H and w_im < W):
                            continue
                        h0, w0 = math.floor(h_im), math.floor(w_im)
                        lh, lw = h_im - h0, w_im - w0
                        acc = value.new_zeros(D)
                        for hh, ww, wt in (
                            (h0, w0, (1 - lh) * (1 - lw)),
                            (h0, w0 + 1, (1 - lh) * lw),
                            (h0 + 1, w0, lh * (1 - lw)),
                            (h0 + 1, w0 + 1, lh * lw),
                        ):
                            if 0 <= hh < H and 0 <= ww < W:
                                acc = acc + wt * v[hh, ww]
                        out[n, q, m] += attw[n, q, m, l, p] * acc
    return out.view(N, Lq, M * D)


class MSDeformAttn(nn.Module):
    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4, ratio=1.0):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError("d_model must be divisible by n_heads")
        self.im2col_step = 64
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.ratio = ratio
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, int(d_model * ratio))
        self.output_proj = nn.Linear(int(d_model * ratio), d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        constant_(self.sampling_offsets.weight.data, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid_init = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid_init = (
            (grid_init / grid_init.abs().max(-1, keepdim=True)[0])
            .view(self.n_heads, 1, 1, 2)
            .repeat(1, self.n_levels, self.n_points, 1)
        )
        for i in range(self.n_points):
            grid_init[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias = nn.Parameter(grid_init.view(-1))
        constant_(self.attention_weights.weight.data, 0.0)
        constant_(self.attention_weights.bias.data, 0.0)
        xavier_uniform_(self.value_proj.weight.data)
        constant_(self.value_proj.bias.data, 0.0)
        xavier_uniform_(self.output_proj.weight.data)
        constant_(self.output_proj.bias.data, 0.0)

    def forward(
        self,
        query,
        reference_points,
        input_flatten,
        input_spatial_shapes,
        input_level_start_index,
        input_padding_mask=None,
    ):
        N, Len_q, _ = query.shape
        N, Len_in, _ = input_flatten.shape
        assert (input_spatial_shapes[:, 0] * input_spatial_shapes[:, 1]).sum() == Len_in
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], float(0))
        value = value.view(N, Len_in, self.n_heads, int(self.ratio * self.d_model) // self.n_heads)
        sampling_offsets = self.sampling_offsets(query).view(
            N, Len_q, self.n_heads, self.n_levels, self.n_points, 2
        )
        attention_weights = self.attention_weights(query).view(
            N, Len_q, self.n_heads, self.n_levels * self.n_points
        )
        attention_weights = F.softmax(attention_weights, -1).view(
            N, Len_q, self.n_heads, self.n_levels, self.n_points
        )
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: divide by (W_l, H_l)
            offset_normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            sampling_locations = (
                reference_points[:, :, None, :, None, :]
                + sampling_offsets / offset_normalizer[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            sampling_locations = (
                reference_points[:, :, None, :, None, :2]
                + sampling_offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError("Last dim of reference_points must be 2 or 4")
        # official: MSDeformAttnFunction.apply(...) (CUDA, custom_fwd(cast_inputs=float32))
        output = ms_deform_attn_core_pytorch(
            value, input_spatial_shapes, sampling_locations, attention_weights
        )
        output = self.output_proj(output)
        return output


# ----------------------------------------------------------------------------------------------
# (b) deform inputs (comer_modules.py 13-63)
# ----------------------------------------------------------------------------------------------
def get_reference_points(spatial_shapes, device):
    reference_points_list = []
    for lvl, (H_, W_) in enumerate(spatial_shapes):
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(0.5, H_ - 0.5, H_, dtype=torch.float32, device=device),
            torch.linspace(0.5, W_ - 0.5, W_, dtype=torch.float32, device=device),
            indexing="ij",
        )
        ref_y = ref_y.reshape(-1)[None] / H_
        ref_x = ref_x.reshape(-1)[None] / W_
        ref = torch.stack((ref_x, ref_y), -1)
        reference_points_list.append(ref)
    reference_points = torch.cat(reference_points_list, 1)
    reference_points = reference_points[:, :, None]  # [1, Lq, 1, 2]  (one "level" -> broadcast)
    return reference_points


def deform_inputs(x):
    """Official: built from the IMAGE size with /8,/16,/32 (patch-16 assumption). Both outputs are passed into
    CTIBlock.forward but never used there (CTI_toV uses deform_inputs_only_one; CTI_toC ignores its args)."""
    bs, c, h, w = x.shape
    spatial_shapes = torch.as_tensor(
        [(h // 8, w // 8), (h // 16, w // 16), (h // 32, w // 32)], dtype=torch.long, device=x.device
    )
    level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
    reference_points = get_reference_points([(h // 16, w // 16)], x.device)
    deform_inputs1 = [reference_points, spatial_shapes, level_start_index]  # ViT queries -> 3 CNN levels

    spatial_shapes = torch.as_tensor([(h // 16, w // 16)], dtype=torch.long, device=x.device)
    level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
    reference_points = get_reference_points(
        [(h // 8, w // 8), (h // 16, w // 16), (h // 32, w // 32)], x.device
    )
    deform_inputs2 = [reference_points, spatial_shapes, level_start_index]  # CNN queries -> 1 ViT level
    return deform_inputs1, deform_inputs2


def deform_inputs_only_one(x, h, w):
    """Called by the official code with (h, w) = (H*16, W*16), H, W = ViT token grid, so the levels are
    (2H,2W), (H,W), (H//2,W//2) for ANY patch size. Queries = all 3 levels, values = all 3 levels."""
    spatial_shapes = torch.as_tensor(
        [(h // 8, w // 8), (h // 16, w // 16), (h // 32, w // 32)], dtype=torch.long, device=x.device
    )
    level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
    reference_points = get_reference_points(
        [(h // 8, w // 8), (h // 16, w // 16), (h // 32, w // 32)], device=x.device
    )
    return [reference_points, spatial_shapes, level_start_index]


# ----------------------------------------------------------------------------------------------
# (d) ConvFFN / DWConv (comer_modules.py 66-85, 110-125)
# ----------------------------------------------------------------------------------------------
class DWConv(nn.Module):
    """ONE depthwise 3x3 conv shared by the three scales."""

    def __init__(self, dim=768):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x, H, W):
        B, N, C = x.shape
        n = N // 21
        x1 = x[:, 0 : 16 * n, :].transpose(1, 2).reshape(B, C, H * 2, W * 2).contiguous()
        x2 = x[:, 16 * n : 20 * n, :].transpose(1, 2).reshape(B, C, H, W).contiguous()
        x3 = x[:, 20 * n :, :].transpose(1, 2).reshape(B, C, H // 2, W // 2).contiguous()
        x1 = self.dwconv(x1).flatten(2).transpose(1, 2)
        x2 = self.dwconv(x2).flatten(2).transpose(1, 2)
        x3 = self.dwconv(x3).flatten(2).transpose(1, 2)
        return torch.cat([x1, x2, x3], dim=1)


class ConvFFN(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x, H, W):
        x = self.fc1(x)
        x = self.dwconv(x, H, W)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        x = self.drop(x)
        return x


# ----------------------------------------------------------------------------------------------
# (c) MultiDWConv / MRFP (comer_modules.py 88-107, 128-179)
# ----------------------------------------------------------------------------------------------
class MultiDWConv(nn.Module):
    def __init__(self, dim=768):
        super().__init__()
        dim1 = dim
        dim = dim // 2
        self.dwconv1 = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)  # 1/8 level, first half
        self.dwconv2 = nn.Conv2d(dim, dim, 5, 1, 2, bias=True, groups=dim)  # 1/8 level, second half
        self.dwconv3 = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)  # 1/16
        self.dwconv4 = nn.Conv2d(dim, dim, 5, 1, 2, bias=True, groups=dim)
        self.dwconv5 = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)  # 1/32
        self.dwconv6 = nn.Conv2d(dim, dim, 5, 1, 2, bias=True, groups=dim)
        self.act1 = nn.GELU()
        self.bn1 = nn.BatchNorm2d(dim1)  # plain BN (not Sync) in the official code
        self.act2 = nn.GELU()
        self.bn2 = nn.BatchNorm2d(dim1)
        self.act3 = nn.GELU()
        self.bn3 = nn.BatchNorm2d(dim1)

    def forward(self, x, H, W):
        B, N, C = x.shape
        n = N // 21
        x1 = x[:, 0 : 16 * n, :].transpose(1, 2).reshape(B, C, H * 2, W * 2).contiguous()
        x2 = x[:, 16 * n : 20 * n, :].transpose(1, 2).reshape(B, C, H, W).contiguous()
        x3 = x[:, 20 * n :, :].transpose(1, 2).reshape(B, C, H // 2, W // 2).contiguous()

        x11, x12 = x1[:, : C // 2, :, :], x1[:, C // 2 :, :, :]
        x11 = self.dwconv1(x11)
        x12 = self.dwconv2(x12)
        x1 = torch.cat([x11, x12], dim=1)
        x1 = self.act1(self.bn1(x1)).flatten(2).transpose(1, 2)

        x21, x22 = x2[:, : C // 2, :, :], x2[:, C // 2 :, :, :]
        x21 = self.dwconv3(x21)
        x22 = self.dwconv4(x22)
        x2 = torch.cat([x21, x22], dim=1)
        x2 = self.act2(self.bn2(x2)).flatten(2).transpose(1, 2)

        x31, x32 = x3[:, : C // 2, :, :], x3[:, C // 2 :, :, :]
        x31 = self.dwconv5(x31)
        x32 = self.dwconv6(x32)
        x3 = torch.cat([x31, x32], dim=1)
        x3 = self.act3(self.bn3(x3)).flatten(2).transpose(1, 2)
        return torch.cat([x1, x2, x3], dim=1)


class MRFP(nn.Module):
    """c -> fc2(drop(GELU(MultiDWConv(fc1(c))))); MultiDWConv already ends in BN+GELU => GELU applied twice.
    NO residual: CTIBlock does `c = self.mrfp(c, H, W)`."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = MultiDWConv(hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x, H, W):
        x = self.fc1(x)
        x = self.dwconv(x, H, W)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        x = self.drop(x)
        return x


# ----------------------------------------------------------------------------------------------
# (e) CTI modules (comer_modules.py 181-432)
# ----------------------------------------------------------------------------------------------
LN = partial(nn.LayerNorm, eps=1e-6)


class MultiscaleExtractor(nn.Module):
    def __init__(
        self,
        dim,
        num_heads=6,
        n_points=4,
        n_levels=1,
        deform_ratio=1.0,
        with_cffn=True,
        cffn_ratio=0.25,
        drop=0.0,
        drop_path=0.0,
        norm_layer=LN,
        with_cp=False,
    ):
        super().__init__()
        self.query_norm = norm_layer(dim)
        self.feat_norm = norm_layer(dim)
        self.attn = MSDeformAttn(
            d_model=dim, n_levels=n_levels, n_heads=num_heads, n_points=n_points, ratio=deform_ratio
        )
        self.with_cffn = with_cffn
        if with_cffn:
            self.ffn = ConvFFN(in_features=dim, hidden_features=int(dim * cffn_ratio), drop=drop)
            self.ffn_norm = norm_layer(dim)
            self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, query, reference_points, feat, spatial_shapes, level_start_index, H, W):
        attn = self.attn(
            self.query_norm(query),
            reference_points,
            self.feat_norm(feat),
            spatial_shapes,
            level_start_index,
            None,
        )
        query = query + attn
        if self.with_cffn:
            query = query + self.drop_path(self.ffn(self.ffn_norm(query), H, W))
        return query


class CTI_toC(nn.Module):
    """ViT -> CNN. c3 += x; then (if cnn_feature_interaction) deformable SELF-attention over c's 3 levels.
    The residual stream becomes query_norm(c) (the caller's LN output is passed in as `query`)."""

    def __init__(
        self,
        dim,
        num_heads=6,
        n_points=4,
        n_levels=1,
        deform_ratio=1.0,
        with_cffn=True,
        cffn_ratio=0.25,
        drop=0.0,
        drop_path=0.0,
        norm_layer=LN,
        with_cp=False,
        cnn_feature_interaction=True,
    ):
        super().__init__()
        self.query_norm = norm_layer(dim)
        self.feat_norm = norm_layer(dim)
        self.with_cffn = with_cffn
        self.cnn_feature_interaction = cnn_feature_interaction
        if cnn_feature_interaction:
            self.cfinter = MultiscaleExtractor(
                dim=dim,
                n_levels=3,
                num_heads=num_heads,
                n_points=n_points,
                norm_layer=norm_layer,
                deform_ratio=deform_ratio,
                with_cffn=with_cffn,
                cffn_ratio=cffn_ratio,
                drop=drop,
                drop_path=drop_path,
                with_cp=with_cp,
            )

    def forward(self, query, reference_points, feat, spatial_shapes, level_start_index, H, W):
        # reference_points / spatial_shapes / level_start_index arguments are IGNORED (official behaviour)
        B, N, C = query.shape
        n = N // 21
        x1 = query[:, 0 : 16 * n, :].contiguous()
        x2 = query[:, 16 * n : 20 * n, :].contiguous()
        x3 = query[:, 20 * n :, :].contiguous()
        x2 = x2 + feat
        query = torch.cat([x1, x2, x3], dim=1)
        if self.cnn_feature_interaction:
            deform_input = deform_inputs_only_one(query, H * 16, W * 16)
            query = self.cfinter(
                query=self.query_norm(query),
                reference_points=deform_input[0],
                feat=self.feat_norm(query),
                spatial_shapes=deform_input[1],
                level_start_index=deform_input[2],
                H=H,
                W=W,
            )
        return query


class Extractor_CTI(nn.Module):
    """Extra CTI (4 of them, last interaction only): c3 += x; c = c + FFN(LN(c)); then the same
    cfinter self-attention as CTI_toC (with the LN'd c as residual)."""

    def __init__(
        self,
        dim,
        num_heads=6,
        n_points=4,
        n_levels=1,
        deform_ratio=1.0,
        with_cffn=True,
        cffn_ratio=0.25,
        drop=0.0,
        drop_path=0.0,
        norm_layer=LN,
        with_cp=False,
        cnn_feature_interaction=True,
    ):
        super().__init__()
        self.query_norm = norm_layer(dim)
        self.feat_norm = norm_layer(dim)
        self.with_cffn = with_cffn
        if with_cffn:
            self.ffn = ConvFFN(in_features=dim, hidden_features=int(dim * cffn_ratio), drop=drop)
            self.ffn_norm = norm_layer(dim)
            self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.cnn_feature_interaction = cnn_feature_interaction
        if cnn_feature_interaction:
            self.cfinter = MultiscaleExtractor(
                dim=dim,
                n_levels=3,
                num_heads=num_heads,
                n_points=n_points,
                norm_layer=norm_layer,
                deform_ratio=deform_ratio,
                with_cffn=with_cffn,
                cffn_ratio=cffn_ratio,
                drop=drop,
                drop_path=drop_path,
                with_cp=with_cp,
            )

    def forward(self, query, reference_points, feat, spatial_shapes, level_start_index, H, W):
        B, N, C = query.shape
        n = N // 21
        x1 = query[:, 0 : 16 * n, :].contiguous()
        x2 = query[:, 16 * n : 20 * n, :].contiguous()
        x3 = query[:, 20 * n :, :].contiguous()
        x2 = x2 + feat
        query = torch.cat([x1, x2, x3], dim=1)
        if self.with_cffn:
            query = query + self.drop_path(self.ffn(self.ffn_norm(query), H, W))
        if self.cnn_feature_interaction:
            deform_input = deform_inputs_only_one(query, H * 16, W * 16)
            query = self.cfinter(
                query=self.query_norm(query),
                reference_points=deform_input[0],
                feat=self.feat_norm(query),
                spatial_shapes=deform_input[1],
                level_start_index=deform_input[2],
                H=H,
                W=W,
            )
        return query


class CTI_toV(nn.Module):
    """CNN -> ViT. Deformable SELF-attention over c (query = value = LN(c), 3 levels), + ConvFFN, then the
    1/8 part x0.5 and the 1/32 part x2 (bilinear) are summed with the 1/16 part: x = x + gamma * sum.
    c itself is NOT updated here; attention output has no residual from c."""

    def __init__(
        self,
        dim,
        num_heads=6,
        n_points=4,
        n_levels=1,
        deform_ratio=1.0,
        norm_layer=LN,
        init_values=0.0,
        with_cp=False,
        drop=0.0,
        drop_path=0.0,
        cffn_ratio=0.25,
    ):
        super().__init__()
        self.query_norm = norm_layer(dim)
        self.feat_norm = norm_layer(dim)
        self.attn = MSDeformAttn(
            d_model=dim, n_levels=n_levels, n_heads=num_heads, n_points=n_points, ratio=deform_ratio
        )
        self.gamma = nn.Parameter(init_values * torch.ones((dim)), requires_grad=True)
        self.ffn = ConvFFN(in_features=dim, hidden_features=int(dim * cffn_ratio), drop=drop)
        self.ffn_norm = norm_layer(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, query, reference_points, feat, spatial_shapes, level_start_index, H, W):
        B, N, C = feat.shape
        c1 = self.attn(
            self.query_norm(feat),
            reference_points,
            self.feat_norm(feat),
            spatial_shapes,
            level_start_index,
            None,
        )
        c1 = c1 + self.drop_path(self.ffn(self.ffn_norm(c1), H, W))
        c_select1, c_select2, c_select3 = (
            c1[:, : H * W * 4, :],
            c1[:, H * W * 4 : H * W * 4 + H * W, :],
            c1[:, H * W * 4 + H * W :, :],
        )
        c_select1 = (
            F.interpolate(
                c_select1.permute(0, 2, 1).reshape(B, C, H * 2, W * 2),
                scale_factor=0.5,
                mode="bilinear",
                align_corners=False,
            )
            .flatten(2)
            .permute(0, 2, 1)
        )
        c_select3 = (
            F.interpolate(
                c_select3.permute(0, 2, 1).reshape(B, C, H // 2, W // 2),
                scale_factor=2,
                mode="bilinear",
                align_corners=False,
            )
            .flatten(2)
            .permute(0, 2, 1)
        )
        return query + self.gamma * (c_select1 + c_select2 + c_select3)


class CTIBlock(nn.Module):
    def __init__(
        self,
        dim,
        num_heads=6,
        n_points=4,
        norm_layer=LN,
        drop=0.0,
        drop_path=0.0,
        with_cffn=True,
        cffn_ratio=0.25,
        init_values=0.0,
        deform_ratio=1.0,
        extra_CTI=False,
        with_cp=False,
        use_CTI_toV=True,
        use_CTI_toC=True,
        dim_ratio=6.0,
        cnn_feature_interaction=False,
    ):
        super().__init__()
        if use_CTI_toV:
            self.cti_tov = CTI_toV(
                dim=dim,
                n_levels=3,
                num_heads=num_heads,
                init_values=init_values,
                n_points=n_points,
                norm_layer=norm_layer,
                deform_ratio=deform_ratio,
                with_cp=with_cp,
                drop=drop,
                drop_path=drop_path,
                cffn_ratio=cffn_ratio,
            )
        if use_CTI_toC:
            self.cti_toc = CTI_toC(
                dim=dim,
                n_levels=1,
                num_heads=num_heads,
                n_points=n_points,
                norm_layer=norm_layer,
                deform_ratio=deform_ratio,
                with_cffn=with_cffn,
                cffn_ratio=cffn_ratio,
                drop=drop,
                drop_path=drop_path,
                with_cp=with_cp,
                cnn_feature_interaction=cnn_feature_interaction,
            )
        if extra_CTI:
            self.extra_CTIs = nn.Sequential(
                *[
                    Extractor_CTI(
                        dim=dim,
                        n_levels=1,
                        num_heads=num_heads,
                        n_points=n_points,
                        norm_layer=norm_layer,
                        deform_ratio=deform_ratio,
                        with_cffn=with_cffn,
                        cffn_ratio=cffn_ratio,
                        drop=drop,
                        drop_path=drop_path,
                        with_cp=with_cp,
                        cnn_feature_interaction=cnn_feature_interaction,
                    )
                    for _ in range(4)
                ]
            )
        else:
            self.extra_CTIs = None
        self.use_CTI_toV = use_CTI_toV
        self.use_CTI_toC = use_CTI_toC
        self.mrfp = MRFP(dim, hidden_features=int(dim * dim_ratio))

    def forward(self, x, c, blocks, deform_inputs1, deform_inputs2, H, W):
        B, N, C = x.shape
        deform_inputs = deform_inputs_only_one(x, H * 16, W * 16)
        if self.use_CTI_toV:
            c = self.mrfp(c, H, W)  # no residual
            c_select1, c_select2, c_select3 = (
                c[:, : H * W * 4, :],
                c[:, H * W * 4 : H * W * 4 + H * W, :],
                c[:, H * W * 4 + H * W :, :],
            )
            c = torch.cat([c_select1, c_select2 + x, c_select3], dim=1)  # inject x into the 1/16 level
            x = self.cti_tov(
                query=x,
                reference_points=deform_inputs[0],
                feat=c,
                spatial_shapes=deform_inputs[1],
                level_start_index=deform_inputs[2],
                H=H,
                W=W,
            )
        for idx, blk in enumerate(blocks):
            x = blk(x, H, W)
        if self.use_CTI_toC:
            c = self.cti_toc(
                query=c,
                reference_points=deform_inputs2[0],
                feat=x,
                spatial_shapes=deform_inputs2[1],
                level_start_index=deform_inputs2[2],
                H=H,
                W=W,
            )
        if self.extra_CTIs is not None:
            for cti in self.extra_CTIs:
                c = cti(
                    query=c,
                    reference_points=deform_inputs2[0],
                    feat=x,
                    spatial_shapes=deform_inputs2[1],
                    level_start_index=deform_inputs2[2],
                    H=H,
                    W=W,
                )
        return x, c


# ----------------------------------------------------------------------------------------------
# (f) CNN branch / spm (comer_modules.py 435-487)
# ----------------------------------------------------------------------------------------------
class CNN(nn.Module):
    def __init__(self, inplanes=64, embed_dim=384, norm_layer=nn.BatchNorm2d, stem_pool=True):
        super().__init__()
        # DEVIATION: official norm is nn.SyncBatchNorm; stem_pool=False replaces the MaxPool (for ViT patch 8)
        self.stem = nn.Sequential(
            *[
                nn.Conv2d(3, inplanes, kernel_size=3, stride=2, padding=1, bias=False),
                norm_layer(inplanes),
                nn.ReLU(inplace=True),
                nn.Conv2d(inplanes, inplanes, kernel_size=3, stride=1, padding=1, bias=False),
                norm_layer(inplanes),
                nn.ReLU(inplace=True),
                nn.Conv2d(inplanes, inplanes, kernel_size=3, stride=1, padding=1, bias=False),
                norm_layer(inplanes),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem_pool else nn.Identity(),
            ]
        )
        self.conv2 = nn.Sequential(
            *[
                nn.Conv2d(inplanes, 2 * inplanes, kernel_size=3, stride=2, padding=1, bias=False),
                norm_layer(2 * inplanes),
                nn.ReLU(inplace=True),
            ]
        )
        self.conv3 = nn.Sequential(
            *[
                nn.Conv2d(2 * inplanes, 4 * inplanes, kernel_size=3, stride=2, padding=1, bias=False),
                norm_layer(4 * inplanes),
                nn.ReLU(inplace=True),
            ]
        )
        self.conv4 = nn.Sequential(
            *[
                nn.Conv2d(4 * inplanes, 4 * inplanes, kernel_size=3, stride=2, padding=1, bias=False),
                norm_layer(4 * inplanes),
                nn.ReLU(inplace=True),
            ]
        )
        self.fc1 = nn.Conv2d(inplanes, embed_dim, kernel_size=1, stride=1, padding=0, bias=True)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, kernel_size=1, stride=1, padding=0, bias=True)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, kernel_size=1, stride=1, padding=0, bias=True)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dim, kernel_size=1, stride=1, padding=0, bias=True)

    def forward(self, x):
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        c1 = self.fc1(c1)
        c2 = self.fc2(c2)
        c3 = self.fc3(c3)
        c4 = self.fc4(c4)
        bs, dim, _, _ = c1.shape
        c2 = c2.view(bs, dim, -1).transpose(1, 2)  # 8s   (c1 stays a [B, D, 4H, 4W] map)
        c3 = c3.view(bs, dim, -1).transpose(1, 2)  # 16s
        c4 = c4.view(bs, dim, -1).transpose(1, 2)  # 32s
        return c1, c2, c3, c4


# ----------------------------------------------------------------------------------------------
# ViT stand-in: official base/vit.py PatchEmbed / Attention / Block (layer_scale=True is the default there)
# ----------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        x = self.proj(x)
        _, _, H, W = x.shape
        return x.flatten(2).transpose(1, 2), H, W


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, H, W):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(
        self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0, norm_layer=LN, layer_scale=True
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.layer_scale = layer_scale
        if layer_scale:
            self.gamma1 = nn.Parameter(torch.ones((dim)), requires_grad=True)
            self.gamma2 = nn.Parameter(torch.ones((dim)), requires_grad=True)

    def forward(self, x, H, W):
        if self.layer_scale:
            x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x), H, W))
            x = x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))
        else:
            x = x + self.drop_path(self.attn(self.norm1(x), H, W))
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


# ----------------------------------------------------------------------------------------------
# Full backbone (vit_comer.py 19-144)
# ----------------------------------------------------------------------------------------------
class ViTCoMerRef(nn.Module):
    def __init__(
        self,
        pretrain_size=224,
        patch_size=16,
        embed_dim=192,
        depth=12,
        num_heads=3,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_path_rate=0.1,
        layer_scale=True,
        conv_inplane=64,
        n_points=4,
        deform_num_heads=6,
        init_values=0.0,
        interaction_indexes=((0, 2), (3, 5), (6, 8), (9, 11)),
        with_cffn=True,
        cffn_ratio=0.25,
        deform_ratio=1.0,
        add_vit_feature=True,
        use_extra_CTI=True,
        use_CTI_toV=True,
        use_CTI_toC=True,
        cnn_feature_interaction=True,
        dim_ratio=6.0,
        stem_pool=None,
        norm2d=nn.BatchNorm2d,
    ):
        super().__init__()
        norm_layer = LN
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        # --- TIMMVisionTransformer part (vit.py 284-317) ---
        self.patch_embed = PatchEmbed(pretrain_size, patch_size, 3, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))  # zeros!
        self.pos_drop = nn.Dropout(0.0)
        dpr = [v.item() for v in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.Sequential(
            *[
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i], norm_layer, layer_scale)
                for i in range(depth)
            ]
        )
        # --- ViTCoMer part (vit_comer.py 33-66) ---
        self.pretrain_size = (pretrain_size, pretrain_size)
        self.interaction_indexes = [list(ix) for ix in interaction_indexes]
        self.add_vit_feature = add_vit_feature
        self.level_embed = nn.Parameter(torch.zeros(3, embed_dim))
        if stem_pool is None:
            stem_pool = patch_size == 16
        self.spm = CNN(inplanes=conv_inplane, embed_dim=embed_dim, norm_layer=norm2d, stem_pool=stem_pool)
        n_int = len(self.interaction_indexes)
        pick = lambda v, i: v if isinstance(v, bool) else v[i]
        self.interactions = nn.Sequential(
            *[
                CTIBlock(
                    dim=embed_dim,
                    num_heads=deform_num_heads,
                    n_points=n_points,
                    init_values=init_values,
                    drop_path=drop_path_rate,  # constant (not the linspace dpr)
                    norm_layer=norm_layer,
                    with_cffn=with_cffn,
                    cffn_ratio=cffn_ratio,
                    deform_ratio=deform_ratio,
                    use_CTI_toV=pick(use_CTI_toV, i),
                    use_CTI_toC=pick(use_CTI_toC, i),
                    dim_ratio=dim_ratio,
                    cnn_feature_interaction=pick(cnn_feature_interaction, i),
                    extra_CTI=((i == n_int - 1) and use_extra_CTI),
                )
                for i in range(n_int)
            ]
        )
        self.up = nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2)
        self.norm1 = norm2d(embed_dim)  # DEVIATION: SyncBatchNorm officially
        self.norm2 = norm2d(embed_dim)
        self.norm3 = norm2d(embed_dim)
        self.norm4 = norm2d(embed_dim)
        self.up.apply(self._init_weights)
        self.spm.apply(self._init_weights)
        self.interactions.apply(self._init_weights)
        self.apply(self._init_deform_weights)
        normal_(self.level_embed)  # std 1 !

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm) or isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)
        elif isinstance(m, nn.Conv2d) or isinstance(m, nn.ConvTranspose2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            fan_out //= m.groups
            m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                m.bias.data.zero_()

    @staticmethod
    def _init_deform_weights(m):
        if isinstance(m, MSDeformAttn):
            m._reset_parameters()

    def _get_pos_embed(self, pos_embed, H, W):
        g = self.pretrain_size[0] // self.patch_size  # DEVIATION: official hard-codes // 16
        pos_embed = pos_embed.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        pos_embed = (
            F.interpolate(pos_embed, size=(H, W), mode="bicubic", align_corners=False)
            .reshape(1, -1, H * W)
            .permute(0, 2, 1)
        )
        return pos_embed

    def _add_level_embed(self, c2, c3, c4):
        return c2 + self.level_embed[0], c3 + self.level_embed[1], c4 + self.level_embed[2]

    def forward(self, x):
        deform_inputs1, deform_inputs2 = deform_inputs(x)  # unused downstream (kept for fidelity)
        c1, c2, c3, c4 = self.spm(x)
        c2, c3, c4 = self._add_level_embed(c2, c3, c4)
        c = torch.cat([c2, c3, c4], dim=1)

        x, H, W = self.patch_embed(x)
        bs, n, dim = x.shape
        pos_embed = self._get_pos_embed(self.pos_embed[:, 1:], H, W)
        x = self.pos_drop(x + pos_embed)

        outs = []
        for i, layer in enumerate(self.interactions):
            indexes = self.interaction_indexes[i]
            x, c = layer(
                x, c, self.blocks[indexes[0] : indexes[-1] + 1], deform_inputs1, deform_inputs2, H, W
            )
            outs.append(x.transpose(1, 2).reshape(bs, dim, H, W).contiguous())

        c2 = c[:, 0 : c2.size(1), :]
        c3 = c[:, c2.size(1) : c2.size(1) + c3.size(1), :]
        c4 = c[:, c2.size(1) + c3.size(1) :, :]
        c2 = c2.transpose(1, 2).reshape(bs, dim, H * 2, W * 2).contiguous()
        c3 = c3.transpose(1, 2).reshape(bs, dim, H, W).contiguous()
        c4 = c4.transpose(1, 2).reshape(bs, dim, H // 2, W // 2).contiguous()
        c1 = self.up(c2) + c1

        if self.add_vit_feature:
            x1, x2, x3, x4 = outs
            x1 = F.interpolate(x1, scale_factor=4, mode="bilinear", align_corners=False)
            x2 = F.interpolate(x2, scale_factor=2, mode="bilinear", align_corners=False)
            x4 = F.interpolate(x4, scale_factor=0.5, mode="bilinear", align_corners=False)
            c1, c2, c3, c4 = c1 + x1, c2 + x2, c3 + x3, c4 + x4

        return [self.norm1(c1), self.norm2(c2), self.norm3(c3), self.norm4(c4)]


# ----------------------------------------------------------------------------------------------
# smoke test
# ----------------------------------------------------------------------------------------------
