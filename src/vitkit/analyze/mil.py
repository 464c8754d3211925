"""Multiple-instance learning over frozen ViT features: a gated-attention MIL head.

Papers: Gul et al., "Histopathological Image Classification based on Self-Supervised Vision
Transformer and Weak Labels" (SPIE Medical Imaging 2022, Self-ViT-MIL; code
gokberkgul/self-learning-transformer-mil) — frozen self-supervised ViT embeddings (mean of the last
layer's patch tokens) aggregated by a MIL head; Ilse, Tomczak, Welling, "Attention-based Deep
Multiple Instance Learning" (ICML 2018) — the gated attention used here:
``a_i = softmax_i(wᵀ(tanh(V h_i) ⊙ sigm(U h_i)))``, ``z = Σ a_i h_i``, ``ŷ = σ(W z)``.

What it changes: nothing in the ViT (frozen, features precomputed once). Simplified: Self-ViT-MIL's
official aggregator is DSMIL's dual stream; the issue asks for gated attention (Ilse et al.), which is
what is implemented; DINO pre-training of the backbone is not part of this module (any run or the
pretrained ViT-S/14 is the feature extractor). Bags are batched with padding and a mask (masked
logits −∞), so a bag's prediction does not depend on the padding or the instance order.
"""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitkit.analyze.common import PixelModel, pixel_transform
from vitkit.data import ImageDataset
from vitkit.errors import VitkitError
from vitkit.models import num_prefix_tokens

BAG_COLUMNS = ("bag_id", "bag", "slide", "slide_id", "patient")
PATH_COLUMNS = ("path", "image", "file", "filename", "filepath")
LABEL_COLUMNS = ("label", "bag_label", "y", "target")


@dataclass
class Bags:
    """Bags of instances: ``members[b]`` indexes rows of ``images`` (or of precomputed features)."""

    ids: list[str]
    labels: torch.Tensor  # (num_bags,) float 0/1
    members: list[list[int]]
    images: torch.Tensor | None = None  # (N, C, H, W) uint8
    paths: list[str] = field(default_factory=list)
    instance_labels: torch.Tensor | None = None  # known only for synthetic bags (evaluation)

    def __len__(self) -> int:
        return len(self.ids)


def _column(lower: dict[str, str], names: tuple[str, ...], what: str, source: str, columns: list[str]) -> str:
    col = next((lower[c] for c in names if c in lower), None)
    if col is None:
        raise VitkitError(f"{source}: no {what} column (expected one of {', '.join(names)}; found {columns})")
    return col


def read_bags_csv(path: str | os.PathLike, img_size: int | None = None) -> Bags:
    """A CSV with a header naming a bag id, an image path (relative to the CSV) and a 0/1 bag label
    per row. Every row of a bag must carry the same label."""
    from PIL import Image, UnidentifiedImageError

    file = Path(str(path).removeprefix("csv:"))
    source = f"csv:{file}"
    if not file.is_file():
        raise VitkitError(f"bag CSV '{file}' does not exist")
    with open(file, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = list(reader.fieldnames or [])
    if not rows:
        raise VitkitError(f"{source}: no rows (expected a header and one row per instance image)")
    lower = {c.lower().strip(): c for c in columns if c}
    bag_col = _column(lower, BAG_COLUMNS, "bag id", source, columns)
    path_col = _column(lower, PATH_COLUMNS, "image path", source, columns)
    label_col = _column(lower, LABEL_COLUMNS, "bag label", source, columns)
    labels: dict[str, tuple[str, int]] = {}
    members: dict[str, list[int]] = {}
    paths: list[Path] = []
    for i, r in enumerate(rows):
        line = i + 2
        bag = (r.get(bag_col) or "").strip()
        lab = (r.get(label_col) or "").strip()
        p = (r.get(path_col) or "").strip()
        if not bag or not p or not lab:
            raise VitkitError(f"{source} line {line}: empty {bag_col!r}, {path_col!r} or {label_col!r}")
        if lab not in ("0", "1"):
            raise VitkitError(f"{source} line {line}: bag label must be 0 or 1, got '{lab}'")
        if bag in labels and labels[bag][0] != lab:
            raise VitkitError(
                f"{source} line {line}: bag '{bag}' has mixed labels ({labels[bag][0]} on line {labels[bag][1]}, "
                f"{lab} here); a bag label applies to the whole bag"
            )
        labels.setdefault(bag, (lab, line))
        members.setdefault(bag, []).append(i)
        full = Path(p) if os.path.isabs(p) else file.parent / p
        if not full.is_file():
            raise VitkitError(
                f"{source} line {line}: image '{full}' not found (paths are relative to the CSV)"
            )
        paths.append(full)
    if len({v[0] for v in labels.values()}) < 2:
        raise VitkitError(
            f"{source}: every bag has label {next(iter(labels.values()))[0]}; MIL needs both 0 and 1 bags"
        )
    arrays = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if img_size is not None:
                    im = im.resize((img_size, img_size), Image.BILINEAR)
                arrays.append(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))
        except (OSError, UnidentifiedImageError) as e:
            raise VitkitError(f"{source}: cannot read image '{p}': {e}") from e
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise VitkitError(
            f"{source}: images have different sizes {sorted(shapes)[:3]}; give an image size to resize them"
        )
    ids = list(members)
    return Bags(
        ids=ids,
        labels=torch.tensor([float(labels[b][0]) for b in ids]),
        members=[members[b] for b in ids],
        images=torch.from_numpy(np.stack(arrays)),
        paths=[str(p) for p in paths],
    )


def synthetic_bags(
    data: ImageDataset,
    positive_class: int,
    num_bags: int = 100,
    bag_size: tuple[int, int] = (8, 32),
    positive_fraction: float = 0.5,
    seed: int = 0,
) -> Bags:
    """Bags drawn from a labelled image set: a bag is positive iff it holds ≥ 1 image of
    ``positive_class`` (1–3 of them in positive bags, none in negative ones)."""
    g = torch.Generator().manual_seed(seed)
    y = data.label_indices()
    pos_idx = torch.nonzero(y == positive_class).flatten()
    neg_idx = torch.nonzero(y != positive_class).flatten()
    members, labels = [], []
    for b in range(num_bags):
        size = int(torch.randint(bag_size[0], bag_size[1] + 1, (1,), generator=g))
        positive = b < round(num_bags * positive_fraction)
        k = int(torch.randint(1, 4, (1,), generator=g)) if positive else 0
        inst = torch.cat(
            [
                pos_idx[torch.randint(len(pos_idx), (k,), generator=g)],
                neg_idx[torch.randint(len(neg_idx), (size - k,), generator=g)],
            ]
        )
        members.append(inst[torch.randperm(len(inst), generator=g)].tolist())
        labels.append(float(positive))
    order = torch.randperm(num_bags, generator=g).tolist()
    return Bags(
        ids=[f"bag{i}" for i in range(num_bags)],
        labels=torch.tensor([labels[i] for i in order]),
        members=[members[i] for i in order],
        images=data.images,
        instance_labels=(y == positive_class).float(),
    )


@torch.no_grad()
def embed_images(
    model: nn.Module,
    images: torch.Tensor,
    *,
    pool: str = "mean",
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Frozen embeddings (N, D): the mean of the last layer's patch tokens (Self-ViT-MIL's choice) or
    the class token (``pool="cls"``)."""
    model = model.to(device).eval()
    pm = PixelModel(model).to(device)
    tf = pixel_transform(model)
    npfx = num_prefix_tokens(model)
    out = []
    for i in range(0, len(images), batch_size):
        x = pm.normalize(tf.images(images[i : i + batch_size]).to(device))
        t = model.forward_features(x)
        if t.ndim == 4:  # a CNN map
            out.append(t.mean((-2, -1)).float().cpu())
        elif pool == "cls":
            if not npfx:
                raise VitkitError("pool='cls' needs a model with a class token")
            out.append(t[:, 0].float().cpu())
        else:
            out.append(t[:, npfx:].mean(1).float().cpu())
    return torch.cat(out)


class GatedAttentionMIL(nn.Module):
    """Ilse et al.'s (gated) attention pooling + a linear bag classifier. ``forward(h, mask)`` takes
    (B, N, D) instances and a (B, N) bool mask of real instances; returns (bag logits (B,), attention
    (B, N) summing to 1 over each bag's real instances)."""

    def __init__(self, in_dim: int, hidden: int = 128, gated: bool = True, dropout: float = 0.0):
        super().__init__()
        self.V = nn.Linear(in_dim, hidden)
        self.U = nn.Linear(in_dim, hidden) if gated else None
        self.w = nn.Linear(hidden, 1)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_dim, 1)

    def attention_logits(self, h: torch.Tensor) -> torch.Tensor:
        a = torch.tanh(self.V(h))
        if self.U is not None:
            a = a * torch.sigmoid(self.U(h))
        return self.w(a).squeeze(-1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.attention_logits(h)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        attn = torch.softmax(logits, dim=1)
        z = torch.einsum("bn,bnd->bd", attn, self.drop(h))
        return self.classifier(z).squeeze(-1), attn


def pad_bags(features: torch.Tensor, members: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, max_n, D) padded instance features and the (B, max_n) mask of real ones."""
    n = max(len(m) for m in members)
    x = features.new_zeros(len(members), n, features.shape[1])
    mask = torch.zeros(len(members), n, dtype=torch.bool)
    for b, m in enumerate(members):
        x[b, : len(m)] = features[m]
        mask[b, : len(m)] = True
    return x, mask


@dataclass
class MILConfig:
    hidden: int = 128
    gated: bool = True
    epochs: int = 60
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 16  # bags per step (padded + masked)
    val_fraction: float = 0.3
    pool: str = "mean"
    seed: int = 0


@dataclass
class MILResult:
    config: dict[str, Any]
    train_bags: int
    val_bags: int
    val_auc: float
    val_accuracy: float
    attention: list[dict[str, Any]]  # per validation bag: id, label, score, instance attention
    top_instance_hit_rate: float | None = None  # synthetic bags: top-attended instance is positive
    model: GatedAttentionMIL | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("model")
        return d


def _split_bags(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in (0.0, 1.0):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)].tolist()
        k = max(1, round(len(idx) * val_fraction))
        val += idx[:k]
        train += idx[k:]
    if not train:
        raise VitkitError("MIL needs at least two bags of each label (one to train, one to validate)")
    return sorted(train), sorted(val)


def fit_mil(features: torch.Tensor, bags: Bags, cfg: MILConfig | None = None) -> MILResult:
    """Train the gated-attention head on a bag split of precomputed features (N, D) and evaluate
    bag-level AUC on the held-out bags."""
    from sklearn.metrics import roc_auc_score

    cfg = cfg or MILConfig()
    if len({float(v) for v in bags.labels}) < 2:
        raise VitkitError("MIL needs bags of both labels (0 and 1)")
    tr, va = _split_bags(bags.labels, cfg.val_fraction, cfg.seed)
    if len({float(bags.labels[i]) for i in va}) < 2:
        raise VitkitError(
            "the validation bags hold one label only: add bags or raise the validation fraction"
        )
    torch.manual_seed(cfg.seed)
    train_inst = features[[i for b in tr for i in bags.members[b]]]
    mu, sd = train_inst.mean(0), train_inst.std(0).clamp_min(1e-6)  # standardise with training bags only
    feats = (features - mu) / sd
    head = GatedAttentionMIL(feats.shape[1], cfg.hidden, cfg.gated)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.epochs):
        head.train()
        order = [tr[i] for i in torch.randperm(len(tr), generator=g).tolist()]
        for i in range(0, len(order), cfg.batch_size):
            batch = order[i : i + cfg.batch_size]
            x, mask = pad_bags(feats, [bags.members[b] for b in batch])
            logit, _ = head(x, mask)
            loss = F.binary_cross_entropy_with_logits(logit, bags.labels[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    head.eval()
    with torch.no_grad():
        x, mask = pad_bags(feats, [bags.members[b] for b in va])
        logit, attn = head(x, mask)
    y = bags.labels[va].numpy()
    score = torch.sigmoid(logit).numpy()
    per_bag, hits, pos = [], 0, 0
    for j, b in enumerate(va):
        a = attn[j, : len(bags.members[b])]
        entry = {
            "bag": bags.ids[b],
            "label": int(y[j]),
            "score": float(score[j]),
            "attention": [round(float(v), 6) for v in a],
        }
        if bags.paths:
            entry["instances"] = [bags.paths[i] for i in bags.members[b]]
        per_bag.append(entry)
        if bags.instance_labels is not None and y[j] == 1:
            pos += 1
            hits += int(bags.instance_labels[bags.members[b][int(a.argmax())]] == 1)
    return MILResult(
        config=asdict(cfg),
        train_bags=len(tr),
        val_bags=len(va),
        val_auc=float(roc_auc_score(y, score)),
        val_accuracy=float(((score > 0.5) == (y > 0.5)).mean()),
        attention=per_bag,
        top_instance_hit_rate=(hits / pos) if pos else None,
        model=head,
    )


def measure_mil(
    model: nn.Module, bags: Bags, cfg: MILConfig | None = None, device: str | torch.device = "cpu"
) -> MILResult:
    """Embed every instance with the frozen ``model`` and fit/evaluate the MIL head."""
    cfg = cfg or MILConfig()
    if bags.images is None:
        raise VitkitError("the bags carry no images to embed")
    used = sorted({i for m in bags.members for i in m})
    emb = embed_images(model, bags.images[used], pool=cfg.pool, device=device)
    feats = torch.zeros(len(bags.images), emb.shape[1])
    feats[used] = emb
    return fit_mil(feats, bags, cfg)
