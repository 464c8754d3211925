"""Feature distillation from a stronger teacher: G2SD's generic stage and ScaleKD's cross-attention
projector with dual-view feature mimicking.

* G2SD — Huang et al., "Generic-to-Specific Distillation of Masked Autoencoders", CVPR 2023.
  Generic stage: the student's tokens at a chosen block, through a projector (G2SD's
  ``Mlp(C_s → C_t → C_t)``), mimic the frozen teacher's tokens at a chosen block, layer-normalised
  without affine, with smooth L1 (β = 2), on all tokens (``supervise_all``). The specific stage is
  DeiT hard distillation (:mod:`vitkit.distill.deit`). **Simplified**: G2SD distils a masked
  autoencoder's *decoder* features on masked images; vitkit has no MAE student here, so this
  distils *encoder* block features of unmasked images. Where the token layouts differ, the CLS
  token and the patch tokens are matched (the teacher's patch grid resampled bilinearly to the
  student's) and other prefix tokens are skipped.
* ScaleKD — Fan et al., "ScaleKD: Strong Vision Transformers Could Be Excellent Teachers",
  NeurIPS 2024. The student's feature map goes through two cross-attention projectors (CAP:
  Conv3×3-BN-ReLU + learnable position embedding as keys/values, learnable queries on the teacher's
  grid through Conv1×1-ReLU, multi-head attention with ``softmax_scale`` 5, LayerNorm, residual FFN
  4×) into the teacher's token space; dual-view feature mimicking (DFM) compares them with the
  teacher's features: spatial ``α₀·Σ‖n_c(P₀(F_s)) − n_c(F_t)‖²/B`` and frequency — the same after
  a 2-D DCT with the DC coefficient zeroed and the inverse DCT — ``α₁·…``; plus logit KD
  ``α·T²·CE(softmax(z_t/T), z_s/T)`` and ``(1−α)·CE``. **Left out**: teacher parameter perception
  (TPP: passing the projected stage-3 student feature through the teacher's last stage); DFM is
  applied at one stage (default: both networks' last feature), not two. Our generalisation: the
  student's grid may differ from the teacher's (keys/values keep the student's grid, queries take
  the teacher's).

Features are taken with forward hooks on the modules named by timm's ``feature_info`` (ViT blocks,
CNN stages), so the student's forward runs through its own ``forward`` (DDP-safe).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from torch import nn

from vitkit.distill.teacher import Teacher, unwrap
from vitkit.errors import VitkitError
from vitkit.models import model_normalization, num_prefix_tokens
from vitkit.train import ClassificationObjective, Objective, ObjectiveOutput


# ---------------------------------------------------------------------------------------------
# Feature taps
# ---------------------------------------------------------------------------------------------
def feature_modules(model: nn.Module) -> list[tuple[str, int]]:
    """(module name, channels) for each entry of timm's ``feature_info``."""
    info = getattr(unwrap(model), "feature_info", None)
    if not info:
        raise VitkitError(f"{type(unwrap(model)).__name__} has no timm feature_info to take features from")
    entries = info.get_dicts() if hasattr(info, "get_dicts") else info
    return [(e["module"], int(e["num_chs"])) for e in entries]


def feature_module(model: nn.Module, layer: int) -> tuple[nn.Module, int]:
    """The module whose output is feature ``layer`` (an index into ``feature_info``) and its channels."""
    mods = feature_modules(model)
    if not -len(mods) <= layer < len(mods):
        raise VitkitError(
            f"feature layer {layer} is out of range: {type(unwrap(model)).__name__} has {len(mods)} feature points"
        )
    name, chans = mods[layer]
    return unwrap(model).get_submodule(name), chans


@contextlib.contextmanager
def tap(module: nn.Module) -> Iterator[dict]:
    """Collect ``module``'s output of the next forward into ``box["out"]``; the hook is removed on exit."""
    box: dict = {}

    def hook(mod, args, out):
        box["out"] = out[0] if isinstance(out, (tuple, list)) else out

    handle = module.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def token_grid(model: nn.Module, num_patches: int) -> tuple[int, int]:
    pe = getattr(unwrap(model), "patch_embed", None)
    grid = getattr(pe, "grid_size", None)
    if grid is not None and grid[0] * grid[1] == num_patches:
        return int(grid[0]), int(grid[1])
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise VitkitError(f"cannot lay {num_patches} patch tokens out on a square grid")
    return side, side


def to_feature_map(feat: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """(B, C, H, W) from a CNN stage output or from ViT tokens (prefix tokens dropped)."""
    if feat.ndim == 4:
        return feat
    if feat.ndim != 3:
        raise VitkitError(f"expected a (B, N, C) or (B, C, H, W) feature, got shape {tuple(feat.shape)}")
    patches = feat[:, num_prefix_tokens(unwrap(model)) :]
    h, w = token_grid(model, patches.shape[1])
    return patches.transpose(1, 2).reshape(feat.shape[0], feat.shape[2], h, w)


def _resize_grid(tokens: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    if src == dst:
        return tokens
    b, _, c = tokens.shape
    m = tokens.transpose(1, 2).reshape(b, c, *src)
    m = F.interpolate(m, size=dst, mode="bilinear", align_corners=False)
    return m.flatten(2).transpose(1, 2)


def align_tokens(
    s: torch.Tensor, student: nn.Module, t: torch.Tensor, teacher: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher token sequences with the same layout: everything when the layouts match;
    otherwise [CLS (when both have one)] + patch tokens on the student's grid."""
    sm, tm = unwrap(student), unwrap(teacher)
    sp, tp = num_prefix_tokens(sm), num_prefix_tokens(tm)
    if s.shape[1] == t.shape[1] and sp == tp:
        return s, t
    s_grid = token_grid(sm, s.shape[1] - sp)
    t_grid = token_grid(tm, t.shape[1] - tp)
    t_patches = _resize_grid(t[:, tp:], t_grid, s_grid)
    both_cls = getattr(sm, "cls_token", None) is not None and getattr(tm, "cls_token", None) is not None
    if both_cls:
        return torch.cat([s[:, :1], s[:, sp:]], 1), torch.cat([t[:, :1], t_patches], 1)
    return s[:, sp:], t_patches


# ---------------------------------------------------------------------------------------------
# G2SD generic stage
# ---------------------------------------------------------------------------------------------
@dataclass
class G2SDConfig:
    """``student_layer`` / ``teacher_layer``: indices into ``feature_info`` (blocks of a ViT).
    ``feature_weight``: weight of the smooth-L1 feature loss; ``ce_weight``: weight of the label CE
    (0: the task-agnostic generic stage alone; > 0: generic and supervised losses together).
    ``beta``: smooth-L1 β (G2SD: 2)."""

    student_layer: int = -1
    teacher_layer: int = -1
    feature_weight: float = 1.0
    ce_weight: float = 1.0
    beta: float = 2.0


class G2SDObjective(Objective):
    """``ce_weight·CE + feature_weight·SmoothL1_β(P(F_s^{(i)}), LN(F_t^{(j)}))`` on all tokens."""

    def __init__(
        self,
        teacher: Teacher,
        student: nn.Module,
        cfg: G2SDConfig | None = None,
        *,
        label_smoothing: float = 0.0,
    ):
        self.cfg = cfg or G2SDConfig()
        self.teacher = teacher
        _, cs = feature_module(student, self.cfg.student_layer)
        self._t_module, ct = feature_module(teacher.model, self.cfg.teacher_layer)
        for who, m in (("student", student), ("teacher", teacher.model)):
            if not hasattr(unwrap(m), "patch_embed"):
                raise VitkitError(
                    f"G2SD mimics ViT tokens; the {who} ({type(unwrap(m)).__name__}) is not a ViT (use --method scalekd)"
                )
        self.student_mean, self.student_std = model_normalization(unwrap(student))
        self.projector = Mlp(cs, hidden_features=ct, out_features=ct)  # G2SD's feature predictor
        self.base = ClassificationObjective("ce", label_smoothing=label_smoothing)
        self.task = "multiclass"

    def trainable_modules(self) -> list[nn.Module]:
        return [self.projector]

    def feature_loss(self, s_tokens: torch.Tensor, t_tokens: torch.Tensor) -> torch.Tensor:
        pred = self.projector(s_tokens.float())
        target = F.layer_norm(t_tokens.float(), t_tokens.shape[-1:])
        return F.smooth_l1_loss(pred, target, beta=self.cfg.beta)

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> ObjectiveOutput:
        s_module, _ = feature_module(model, self.cfg.student_layer)
        with tap(s_module) as s:
            logits = model(images)
        if isinstance(
            logits, tuple
        ):  # a distilled student in distilled training: both heads learn the labels
            logits = (logits[0] + logits[1]) / 2
        self.teacher.to(images.device)
        with torch.no_grad(), tap(self._t_module) as t:
            self.teacher(images, self.student_mean, self.student_std)
        s_tok, t_tok = align_tokens(s["out"], model, t["out"], self.teacher.model)
        feat = self.feature_loss(s_tok, t_tok)
        loss = self.cfg.feature_weight * feat
        logs = {"feature_loss": feat.item()}
        if self.cfg.ce_weight > 0:
            ce = self.base.compute(logits, targets)
            loss = loss + self.cfg.ce_weight * ce
            logs["ce_loss"] = ce.item()
        return ObjectiveOutput(loss, logits, logs)

    def describe(self) -> dict:
        return {"name": "g2sd", **asdict(self.cfg), **self.teacher.describe()}


# ---------------------------------------------------------------------------------------------
# ScaleKD: cross-attention projector + dual-view feature mimicking
# ---------------------------------------------------------------------------------------------
def dct_matrix(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``D`` (``X = D x``; the inverse is ``Dᵀ``)."""
    k = torch.arange(n, device=device, dtype=torch.float64)[:, None]
    i = torch.arange(n, device=device, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(dtype)


def dct2(x: torch.Tensor) -> torch.Tensor:
    """2-D DCT-II over the last two dimensions (orthonormal)."""
    dh = dct_matrix(x.shape[-2], x.device, x.dtype)
    dw = dct_matrix(x.shape[-1], x.device, x.dtype)
    return dh @ x @ dw.T


def idct2(x: torch.Tensor) -> torch.Tensor:
    dh = dct_matrix(x.shape[-2], x.device, x.dtype)
    dw = dct_matrix(x.shape[-1], x.device, x.dtype)
    return dh.T @ x @ dw


def remove_dc(x: torch.Tensor) -> torch.Tensor:
    """ScaleKD's frequency view: DCT, zero the DC coefficient, inverse DCT."""
    X = dct2(x).clone()
    X[..., 0, 0] = 0
    return idct2(X)


def spatial_mimic_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``Σ ‖n_c(pred) − n_c(target)‖² / B`` over (B, C, H, W) maps, ``n_c`` = L2 over channels."""
    p = F.normalize(pred, dim=1)
    t = F.normalize(target, dim=1)
    return (p - t).pow(2).sum() / pred.shape[0]


def frequency_mimic_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return spatial_mimic_loss(remove_dc(pred), remove_dc(target))


class CrossAttentionProjector(nn.Module):
    """ScaleKD's CAP: student map (B, C_s, H_s, W_s) → teacher tokens (B, H_t·W_t, C_t)."""

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        student_hw: tuple[int, int],
        query_hw: tuple[int, int],
        num_heads: int = 8,
        softmax_scale: float = 5.0,
    ):
        super().__init__()
        if teacher_dim % num_heads:
            raise VitkitError(f"ScaleKD: teacher width {teacher_dim} is not divisible by {num_heads} heads")
        self.query_hw = tuple(query_hw)
        self.teacher_dim = teacher_dim
        self.num_heads = num_heads
        self.scale = (teacher_dim // num_heads) ** -0.5 * softmax_scale
        self.proj_student = nn.Sequential(
            nn.Conv2d(student_dim, student_dim, 3, padding=1), nn.BatchNorm2d(student_dim), nn.ReLU()
        )
        self.pos_embed = nn.Parameter(trunc_normal_(torch.zeros(1, student_dim, *student_hw), std=0.02))
        self.query = nn.Embedding(query_hw[0] * query_hw[1], teacher_dim)
        self.proj_pos = nn.Sequential(nn.Conv2d(teacher_dim, teacher_dim, 1), nn.ReLU())
        self.q = nn.Linear(teacher_dim, teacher_dim)
        self.k = nn.Linear(student_dim, teacher_dim)
        self.v = nn.Linear(student_dim, teacher_dim)
        self.proj = nn.Linear(teacher_dim, teacher_dim)
        self.norm = nn.LayerNorm(teacher_dim)
        self.ffn = nn.Sequential(
            nn.Linear(teacher_dim, 4 * teacher_dim), nn.ReLU(), nn.Linear(4 * teacher_dim, teacher_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h, w = self.query_hw
        s = self.proj_student(x) + self.pos_embed
        kv = s.flatten(2).transpose(1, 2)  # (B, HW_s, C_s)
        q0 = self.query.weight.view(1, h, w, self.teacher_dim).permute(0, 3, 1, 2).expand(b, -1, -1, -1)
        q0 = self.proj_pos(q0).flatten(2).transpose(1, 2)  # (B, HW_t, C_t)
        nh, hd = self.num_heads, self.teacher_dim // self.num_heads
        q = self.q(q0).view(b, -1, nh, hd).transpose(1, 2)
        k = self.k(kv).view(b, -1, nh, hd).transpose(1, 2)
        v = self.v(kv).view(b, -1, nh, hd).transpose(1, 2)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
        out = self.proj((attn @ v).transpose(1, 2).reshape(b, h * w, self.teacher_dim))
        out = self.norm(out)
        return out + self.ffn(out)  # mmcv FFN: residual around the MLP


@dataclass
class ScaleKDConfig:
    """Layers index ``feature_info`` (default: both networks' last feature). ``alpha_spatial`` /
    ``alpha_freq``: DFM weights (ScaleKD: 0.08 / 0.06); ``kd_alpha``, ``tau``: logit KD (CE gets
    ``1 − kd_alpha``); ``num_heads``, ``softmax_scale``: CAP attention."""

    student_layer: int = -1
    teacher_layer: int = -1
    alpha_spatial: float = 0.08
    alpha_freq: float = 0.06
    kd_alpha: float = 0.5
    tau: float = 1.0
    num_heads: int = 8
    softmax_scale: float = 5.0


class ScaleKDObjective(Objective):
    """``(1−α)·CE + α·T²·KD + L_spatial + L_frequency`` with two cross-attention projectors."""

    def __init__(
        self,
        teacher: Teacher,
        student: nn.Module,
        cfg: ScaleKDConfig | None = None,
        *,
        label_smoothing: float = 0.0,
    ):
        self.cfg = cfg or ScaleKDConfig()
        self.teacher = teacher
        self.student_mean, self.student_std = model_normalization(unwrap(student))
        s_module, cs = feature_module(student, self.cfg.student_layer)
        self._t_module, ct = feature_module(teacher.model, self.cfg.teacher_layer)
        # One probe forward (eval, no grad) gives both grids.
        s_hw, t_hw = self._probe_grids(student, s_module)
        heads = math.gcd(ct, self.cfg.num_heads)
        self.projectors = nn.ModuleList(
            [CrossAttentionProjector(cs, ct, s_hw, t_hw, heads, self.cfg.softmax_scale) for _ in range(2)]
        )
        self.base = ClassificationObjective("ce", label_smoothing=label_smoothing)

    @torch.no_grad()
    def _probe_grids(
        self, student: nn.Module, s_module: nn.Module
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        from vitkit.models import model_input_size

        m = unwrap(student)
        c, h, w = model_input_size(m)
        x = torch.zeros(1, c, h, w, device=next(m.parameters()).device)
        was = m.training
        m.eval()
        try:
            with tap(s_module) as s:
                m(x)
        finally:
            m.train(was)
        self.teacher.to(x.device)
        with tap(self._t_module) as t:
            self.teacher(x, self.student_mean, self.student_std)
        sm = to_feature_map(s["out"], m)
        tm = to_feature_map(t["out"], self.teacher.model)
        return tuple(sm.shape[-2:]), tuple(tm.shape[-2:])

    def trainable_modules(self) -> list[nn.Module]:
        return [self.projectors]

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> ObjectiveOutput:
        s_module, _ = feature_module(model, self.cfg.student_layer)
        with tap(s_module) as s:
            logits = model(images)
        if isinstance(logits, tuple):
            logits = (logits[0] + logits[1]) / 2
        self.teacher.to(images.device)
        with torch.no_grad(), tap(self._t_module) as t:
            t_logits = self.teacher(images, self.student_mean, self.student_std)
        f_s = to_feature_map(s["out"], model).float()
        f_t = to_feature_map(t["out"], self.teacher.model).float()
        b, ct, h, w = f_t.shape

        def as_map(tokens: torch.Tensor) -> torch.Tensor:
            return tokens.transpose(1, 2).reshape(b, ct, h, w)

        spat = self.cfg.alpha_spatial * spatial_mimic_loss(as_map(self.projectors[0](f_s)), f_t)
        freq = self.cfg.alpha_freq * frequency_mimic_loss(as_map(self.projectors[1](f_s)), f_t)
        tau, a = self.cfg.tau, self.cfg.kd_alpha
        p_t = F.softmax(t_logits / tau, -1)
        kd = -(p_t * F.log_softmax(logits.float() / tau, -1)).sum(-1).mean() * tau * tau
        ce = self.base.compute(logits, targets)
        loss = (1 - a) * ce + a * kd + spat + freq
        logs = {
            "ce_loss": ce.item(),
            "kd_loss": kd.item(),
            "spatial_loss": spat.item(),
            "freq_loss": freq.item(),
        }
        return ObjectiveOutput(loss, logits, logs)

    def describe(self) -> dict:
        return {"name": "scalekd", **asdict(self.cfg), **self.teacher.describe()}
