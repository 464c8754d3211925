"""Retrieval: the model maps an image to an embedding (or a binary hash code); images of the same class
are the relevant results of a query.

- Output: the pre-logits features (``embed_dim`` unset: timm's head becomes the identity), a linear
  projection of them to ``embed_dim``, or, with ``bits``, ``bits`` code logits whose sign is the
  binary code.
- Loss: the supervised contrastive loss, single view with in-batch positives — Khosla et al.,
  "Supervised Contrastive Learning" (NeurIPS 2020), L_out — on L2-normalised embeddings at
  ``temperature``. The paper draws two augmented views per image; here every other image of the
  batch with the same label is a positive, which a 64-image batch of a 10-class set has plenty of.
- Hash codes: trained through the tanh relaxation with continuation of Cao et al., "HashNet: Deep
  Learning to Hash by Continuation" (ICCV 2017): ``tanh(beta * z)`` with beta raised over training
  (geometrically from 1 to ``beta_max``) so the relaxed codes approach sign(z); the same
  contrastive loss runs on the relaxed codes (HashNet pairs the continuation with a weighted
  pairwise likelihood loss; the continuation is what carries over). Evaluation uses sign(z) and
  Hamming distance.
- Metrics, leave-one-out on the validation split (each image queries all the others):
  mAP@R of Musgrave et al., "A Metric Learning Reality Check" (ECCV 2020), R-precision, and
  recall@k (k = 1, 5, 10) in the metric-learning sense: the share of queries with at least one
  relevant image among their k nearest. Recall@k comes from torchmetrics (``RetrievalHitRate``,
  which is exactly that). mAP@R does not: torchmetrics' ``RetrievalMAP(top_k=R)`` averages the
  precision over the relevant images *found* in the top R, where mAP@R divides by R (for a query
  with R = 3 whose ranking is relevant, not, relevant: mAP@R = (1 + 2/3) / 3 = 5/9, torchmetrics
  gives (1 + 2/3) / 2 = 5/6; tests/tasks/test_retrieval_metrics.py checks both), and its
  ``RetrievalRecall`` is the IR recall (relevant found / all relevant), not recall@k above.
- Search: exact, in plain torch — cosine similarity by matmul for embeddings, Hamming distance (from
  the ±1 code inner product) for codes — then a stable sort, so ties (common between codes) rank by
  index and the numbers are reproducible. Not faiss-cpu: it is installable here (PyPI wheel), but an
  exact search over a validation split (thousands of items) is one matmul per query chunk, faiss's
  flat index would compute the same thing through a native dependency vitkit does not otherwise need,
  and its approximate indexes would make the metrics depend on index parameters.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from vitkit.errors import VitkitError
from vitkit.tasks.base import ExportSignature, Task, TensorSpec, register_task
from vitkit.tasks.classification import image_input
from vitkit.train.objectives import Objective, ObjectiveOutput

if TYPE_CHECKING:
    from vitkit.config.train import TrainConfig
    from vitkit.data import DataSplits, ImageDataset

RECALL_KS = (1, 5, 10)


class RetrievalOptions(BaseModel):
    """``--task retrieval:key=value,...``"""

    model_config = ConfigDict(extra="forbid", frozen=True)

    embed_dim: int | None = Field(
        None, gt=0, description="project the pre-logits features to this width (default: keep them)"
    )
    bits: int | None = Field(None, gt=0, le=4096, description="output binary hash codes of this length")
    temperature: float = Field(0.1, gt=0, description="temperature of the supervised contrastive loss")
    beta_max: float = Field(10.0, ge=1, description="hash codes: final tanh slope of the continuation")

    @model_validator(mode="after")
    def _one_output(self) -> RetrievalOptions:
        if self.embed_dim is not None and self.bits is not None:
            raise ValueError("give embed_dim (an embedding) or bits (hash codes), not both")
        return self


def supervised_contrastive_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """Khosla et al. 2020, L_out: for each anchor, the mean over its positives of
    ``-log(exp(s_ap / t) / sum_{a' != a} exp(s_aa' / t))`` on L2-normalised embeddings; anchors
    without a positive in the batch are left out."""
    z = F.normalize(embeddings.float(), dim=1)
    sim = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_prob = sim - torch.logsumexp(sim.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = positives.sum(1)
    has = n_pos > 0
    if not has.any():  # keep the graph: a batch of all-distinct labels contributes nothing
        return sim.sum() * 0.0
    per_anchor = -(log_prob * positives).sum(1)[has] / n_pos[has]
    return per_anchor.mean()


class RetrievalObjective(Objective):
    """Supervised contrastive loss on the embedding, or on tanh(beta z) for hash codes (HashNet)."""

    task = "retrieval"

    def __init__(self, temperature: float = 0.1, bits: int | None = None, beta_max: float = 10.0):
        self.temperature = temperature
        self.bits = bits
        self.beta_max = beta_max
        self.beta = 1.0

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        # HashNet's continuation: a steeper tanh every stage, ending at beta_max.
        self.beta = self.beta_max ** (epoch / max(1, num_epochs - 1))

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> ObjectiveOutput:
        z = model(images).float()
        if self.bits is not None:
            z = torch.tanh(self.beta * z)
        loss = supervised_contrastive_loss(z, targets, self.temperature)
        return ObjectiveOutput(loss, z, {"beta": self.beta} if self.bits is not None else {})

    def describe(self) -> dict:
        return {
            "name": "supervised_contrastive",
            "temperature": self.temperature,
            "bits": self.bits,
            "beta_max": self.beta_max,
        }


# -- search and metrics -------------------------------------------------------------------------
def binary_codes(outputs: torch.Tensor) -> torch.Tensor:
    """sign(z) as ±1 (0 maps to +1, so every bit is defined)."""
    return torch.where(outputs >= 0, 1.0, -1.0)


def leave_one_out_ranking(
    outputs: torch.Tensor, k: int, *, hamming: bool = False, chunk: int = 1024
) -> torch.Tensor:
    """(N, k) indices of each item's k nearest other items, nearest first.

    Embeddings: cosine similarity. Codes (``hamming``): Hamming distance of sign(outputs), computed
    exactly as ``(bits - <b_i, b_j>) / 2``. Ties rank by index (stable sort), the item itself last.
    """
    n = len(outputs)
    k = min(k, n - 1)
    if hamming:
        x = binary_codes(outputs.double())  # float64: the inner products are exact integers
    else:
        x = F.normalize(outputs.double(), dim=1)
    rows = []
    for i0 in range(0, n, chunk):
        q = x[i0 : i0 + chunk]
        score = q @ x.T
        idx = torch.arange(len(q))
        score[idx, i0 + idx] = float("-inf")  # leave the query out
        order = torch.sort(score, dim=1, descending=True, stable=True).indices
        rows.append(order[:, :k])
    return torch.cat(rows) if rows else torch.empty(0, 0, dtype=torch.long)


def map_at_r(relevance: torch.Tensor, num_relevant: torch.Tensor) -> torch.Tensor:
    """Per-query mAP@R (Musgrave et al. 2020): ``(1/R) sum_{i<=R} P@i * rel(i)``.

    ``relevance``: (Q, K) bool, the ranked results (K >= R of every query); ``num_relevant``: (Q,) R.
    """
    rel = relevance.double()
    ranks = torch.arange(1, rel.shape[1] + 1, dtype=torch.float64)
    precision_at = rel.cumsum(1) / ranks
    within = ranks[None, :] <= num_relevant[:, None]
    r = num_relevant.double().clamp(min=1)
    return (precision_at * rel * within).sum(1) / r


def r_precision(relevance: torch.Tensor, num_relevant: torch.Tensor) -> torch.Tensor:
    """Per-query share of relevant items among the first R results."""
    ranks = torch.arange(1, relevance.shape[1] + 1)
    within = ranks[None, :] <= num_relevant[:, None]
    return (relevance & within).sum(1).double() / num_relevant.double().clamp(min=1)


def recall_at_k(relevance: torch.Tensor, ks: tuple[int, ...] = RECALL_KS) -> dict[int, float]:
    """Recall@k of metric learning — queries with a relevant item in their top k — by torchmetrics'
    RetrievalHitRate over the given ranking (scores that decrease along each row, so torchmetrics
    keeps this order)."""
    from torchmetrics.retrieval import RetrievalHitRate

    q, kk = relevance.shape
    preds = -torch.arange(kk, dtype=torch.float32).expand(q, kk)
    indexes = torch.arange(q)[:, None].expand(q, kk)
    out = {}
    for k in ks:
        metric = RetrievalHitRate(top_k=min(k, kk))
        out[k] = float(metric(preds.reshape(-1), relevance.reshape(-1), indexes=indexes.reshape(-1)))
    return out


def retrieval_metrics(
    outputs: torch.Tensor, labels: torch.Tensor, *, hamming: bool = False, ks: tuple[int, ...] = RECALL_KS
) -> dict[str, Any]:
    """Leave-one-out retrieval metrics: each item queries all the others; relevant = same label.
    Queries whose class has no other item are left out (they have no right answer)."""
    labels = labels.long()
    n = len(labels)
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1 if n else 0)
    num_relevant = counts[labels] - 1
    queries = num_relevant > 0
    out: dict[str, Any] = {
        "n": n,
        "queries": int(queries.sum()),
        "search": "hamming" if hamming else "cosine",
    }
    if n < 2 or not queries.any():
        nan = float("nan")
        return {**out, "map_at_r": nan, "r_precision": nan, **{f"recall_at_{k}": nan for k in ks}}
    depth = max(int(num_relevant.max()), max(ks))
    ranking = leave_one_out_ranking(outputs, depth, hamming=hamming)
    relevance = labels[ranking] == labels[:, None]
    relevance, num_relevant = relevance[queries], num_relevant[queries]
    out["map_at_r"] = float(map_at_r(relevance, num_relevant).mean())
    out["r_precision"] = float(r_precision(relevance, num_relevant).mean())
    curve = recall_at_k(relevance, tuple(range(1, max(ks) + 1)))
    out.update({f"recall_at_{k}": curve[k] for k in ks})
    out["recall_curve"] = [curve[k] for k in sorted(curve)]
    return out


@register_task
class RetrievalTask(Task):
    name = "retrieval"
    target = "identity"  # (N,) class indices: the same class is a relevant result
    data_schemes = ("digits", "fashion-mnist", "folder", "csv", "npz")
    summary_keys = ("map_at_r", "r_precision", "recall_at_1", "recall_at_5", "recall_at_10")
    headline = "val_map_at_r"
    val_metrics = ("map_at_r", "recall_at_1")
    Options = RetrievalOptions

    @property
    def hamming(self) -> bool:
        return self.options.bits is not None

    def check_data(self, data: DataSplits) -> None:
        if data.multilabel:
            raise VitkitError(
                f"{data.train.name}: task 'retrieval' needs one label per image (the label says which images match)"
            )

    def check_config(self, cfg: TrainConfig) -> None:
        if cfg.mixup or cfg.cutmix:
            raise VitkitError(
                "task 'retrieval': mixup/cutmix blend labels, which a contrastive loss cannot use"
            )
        if cfg.loss != "auto":
            raise VitkitError(
                f"task 'retrieval' trains with the supervised contrastive loss; drop --loss {cfg.loss}"
            )
        if cfg.label_smoothing:
            raise VitkitError("task 'retrieval': label smoothing has no meaning for a contrastive loss")

    def num_outputs(self, data: DataSplits) -> int:
        return self.options.bits or self.options.embed_dim or 0

    def loss(self, cfg: TrainConfig) -> Objective:
        self.check_config(cfg)
        o = self.options
        return RetrievalObjective(o.temperature, o.bits, o.beta_max)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor, **_: Any) -> dict[str, Any]:
        out = retrieval_metrics(outputs, targets, hamming=self.hamming)
        out["dim"] = int(outputs.shape[1]) if outputs.ndim == 2 else 0
        out["task"] = self.spec
        return out

    def write_plots(self, metrics: dict[str, Any], data: ImageDataset, out_dir: Path) -> list[str]:
        curve = metrics.get("recall_curve")
        if not curve or any(math.isnan(v) for v in curve):
            return []
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from vitkit.io import atomic_path

        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        ks = list(range(1, len(curve) + 1))
        ax.plot(ks, curve, marker="o")
        ax.set_xlabel("k")
        ax.set_ylabel("recall@k")
        ax.set_ylim(0, 1.02)
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
        ax.set_title(f"{self.spec}: mAP@R {metrics['map_at_r']:.3f} ({metrics['search']})", fontsize=9)
        fig.tight_layout()
        with atomic_path(out_dir / "recall_at_k.png") as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        return ["recall_at_k.png"]

    def output_files(self, metrics: dict[str, Any]) -> list[str]:
        return ["metrics.json", "recall_at_k.png"]

    def export_signature(self, model: nn.Module) -> ExportSignature:
        width = getattr(model, "num_classes", 0) or getattr(model, "num_features", "D")
        if self.hamming:
            out = TensorSpec("code_logits", ("B", width), "float32", "real-valued hash logits z")
            post = "sign(z) gives the ±1 code; rank by Hamming distance (bits - <b_q, b_i>) / 2"
        else:
            out = TensorSpec("embedding", ("B", width), "float32", "image embedding")
            post = "L2-normalise; rank by cosine similarity (inner product of normalised embeddings)"
        return ExportSignature((image_input(model),), (out,), post)
