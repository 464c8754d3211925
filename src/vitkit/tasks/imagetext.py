"""Image-text: a CLIP-style model learns one embedding space for images and their captions —
Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (2021),
with open-clip-torch's text tower, tokenizer and contrastive loss (``open_clip.ClipLoss``: the
symmetric cross-entropy over the in-batch image-caption similarity matrix, scaled by the learned
temperature).

- Data: ``imagetext:CSV`` (in memory) or ``shards:PATTERN`` (webdataset tar shards, streamed);
  see :mod:`vitkit.data.imagetext`. Targets are caption ids; the batch transform turns them (or a
  stream's caption strings) into open_clip tokens.
- Model: any timm ViT as the image tower, its classifier the image projection
  (:mod:`vitkit.models.imagetext`); model.json records the text tower as the run's ``head``.
- Metrics on the validation pairs: image->text and text->image recall@k (k = 1, 5, 10), a caption
  counting as a right answer for an image when its text equals the image's own caption (templated
  captions repeat, and identical texts have identical embeddings, so only text equality is a fair
  notion of "the right caption"). Zero-shot classification (``vitkit evaluate RUN --zero-shot
  URI``): class-name prompts from :data:`ZERO_SHOT_TEMPLATES`, their text embeddings averaged per
  class (CLIP's prompt ensembling), top-1 of the image embedding's nearest class.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from vitkit.data.imagetext import readable_class_name
from vitkit.errors import VitkitError
from vitkit.tasks.base import ExportSignature, Task, TensorSpec, refuse_image_label_options, register_task
from vitkit.tasks.classification import image_input
from vitkit.train.objectives import Objective, ObjectiveOutput

if TYPE_CHECKING:
    from vitkit.config.train import TrainConfig
    from vitkit.data import BatchTransform, DataSplits, ImageDataset

RECALL_KS = (1, 5, 10)
#: CLIP-style prompts for zero-shot classification; ``{}`` is the readable class name
ZERO_SHOT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a grayscale photo of a {}.",
)


class ImageTextOptions(BaseModel):
    """``--task image-text:key=value,...``: the text tower and the shared embedding."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    embed_dim: int = Field(64, gt=0, le=4096, description="width of the shared image-text embedding")
    context_length: int = Field(32, gt=1, le=512, description="caption tokens (longer captions are cut)")
    text_width: int = Field(64, gt=0, le=4096, description="width of the text transformer")
    text_heads: int = Field(4, gt=0, le=64, description="attention heads of the text transformer")
    text_layers: int = Field(2, gt=0, le=48, description="blocks of the text transformer")


@functools.lru_cache(maxsize=4)
def tokenizer(context_length: int):
    from open_clip import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def tokenize(captions: list[str], context_length: int) -> torch.Tensor:
    """open_clip's BPE tokens, (N, context_length) int64, start/end of text included, cut to fit."""
    return tokenizer(context_length)(list(captions)).long()


class ImageTextBatchTransform:
    """Images through vitkit's image transform; caption ids (in-memory pairs) or caption strings (a
    stream) into open_clip tokens."""

    def __init__(self, image_tf: BatchTransform, captions: list[str] | None, context_length: int):
        self.image_tf = image_tf
        self.captions = captions
        self.context_length = context_length

    def images(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.image_tf.images(x, generator) if generator is not None else self.image_tf.images(x)

    def tokens(self, targets: torch.Tensor | list[str]) -> torch.Tensor:
        if isinstance(targets, torch.Tensor):
            if self.captions is None:
                raise RuntimeError("caption ids without a caption table")
            targets = [self.captions[int(i)] for i in targets]
        return tokenize(targets, self.context_length)

    def __call__(self, x: torch.Tensor, targets, generator: torch.Generator | None = None):
        return self.images(x, generator), self.tokens(targets)


class ImageTextObjective(Objective):
    """open_clip's ``ClipLoss`` on the image and text embeddings at the model's learned scale."""

    task = "image-text"

    def __init__(self) -> None:
        import torch.distributed as dist
        from open_clip import ClipLoss

        # under torchrun every process's embeddings are gathered (with gradients), so the negatives of a
        # step are the whole global batch, as open_clip trains
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.loss = ClipLoss(
                gather_with_grad=True, rank=dist.get_rank(), world_size=dist.get_world_size()
            )
        else:
            self.loss = ClipLoss()

    def __call__(self, model: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> ObjectiveOutput:
        image_emb, text_emb, scale = model(images, tokens)
        loss = self.loss(image_emb.float(), text_emb.float(), scale.float())
        return ObjectiveOutput(loss, None, {"logit_scale": float(scale.detach())})

    def describe(self) -> dict:
        return {"name": "clip_contrastive", "loss": "open_clip.ClipLoss"}


# -- metrics --------------------------------------------------------------------------------------
def _recall(sim: torch.Tensor, relevant: torch.Tensor, ks: tuple[int, ...]) -> dict[int, float]:
    """Share of rows with a relevant column among their k most similar (ties by index)."""
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices
    hits = relevant.gather(1, order)
    first = torch.where(hits.any(1), hits.float().argmax(1), torch.full((len(sim),), sim.shape[1]))
    return {k: float((first < k).double().mean()) for k in ks}


def pair_retrieval_metrics(
    image_emb: torch.Tensor, text_emb: torch.Tensor, captions: list[str], ks: tuple[int, ...] = RECALL_KS
) -> dict[str, Any]:
    """Image->text recall@k over the distinct captions, text->image recall@k over the N images; a
    caption whose text equals the pair's own is relevant (see the module docstring)."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    cid = torch.tensor([ids[c] for c in captions])
    seen: dict[str, int] = {}
    for i, c in enumerate(captions):
        seen.setdefault(c, i)
    first = torch.tensor(list(seen.values()))  # one row per distinct caption, in the order of ids
    # image -> text ranks the distinct captions (k copies of one wrong text would fill a top k);
    # text -> image ranks all images, each caption's relevant ones being those it describes
    sim_i2t = image_emb.double() @ text_emb[first].double().T
    i2t = _recall(sim_i2t, cid[:, None] == torch.arange(len(ids))[None, :], ks)
    sim_t2i = text_emb.double() @ image_emb.double().T
    t2i = _recall(sim_t2i, cid[:, None] == cid[None, :], ks)
    out: dict[str, Any] = {"pairs": len(captions), "distinct_captions": len(ids)}
    out.update({f"i2t_recall_at_{k}": i2t[k] for k in ks})
    out.update({f"t2i_recall_at_{k}": t2i[k] for k in ks})
    out["mean_recall_at_1"] = (i2t[ks[0]] + t2i[ks[0]]) / 2
    return out


@torch.no_grad()
def class_text_embeddings(
    model: nn.Module, classes: list[str], templates: tuple[str, ...] = ZERO_SHOT_TEMPLATES
) -> torch.Tensor:
    """(K, E) normalised class embeddings: each class's prompts embedded and averaged (CLIP's prompt
    ensembling), then normalised again."""
    import torch.nn.functional as F

    from vitkit.models.imagetext import ImageTextModel

    if not isinstance(model, ImageTextModel):
        raise VitkitError("zero-shot classification needs an image-text run (vitkit train --task image-text)")
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    rows = []
    for name in classes:
        prompts = [t.format(readable_class_name(name)) for t in templates]
        tokens = tokenize(prompts, model.config.context_length).to(device)
        rows.append(F.normalize(model.encode_text(tokens).float().mean(0), dim=0))
    model.train(was)
    return torch.stack(rows).cpu()


def zero_shot_metrics(
    model: nn.Module, data: ImageDataset, *, batch_size: int = 256, templates=ZERO_SHOT_TEMPLATES
) -> dict[str, Any]:
    """Zero-shot top-1 (and balanced accuracy) of an image-text model on a labelled dataset."""
    from vitkit.models.inference import predict

    if data.multilabel or data.dense or data.boxes or data.num_classes < 2:
        raise VitkitError(f"{data.name}: zero-shot classification needs single-label image data")
    weights = class_text_embeddings(model, list(data.classes), templates)
    image_emb = predict(model, data, batch_size=batch_size)
    pred = (image_emb @ weights.T).argmax(1)
    y = data.targets
    per_class = [
        float((pred[y == k] == k).double().mean()) if (y == k).any() else float("nan")
        for k in range(data.num_classes)
    ]
    present = [a for a in per_class if a == a]
    return {
        "zero_shot_top1": float((pred == y).double().mean()),
        "zero_shot_balanced_accuracy": sum(present) / len(present),
        "zero_shot_per_class": per_class,
        "zero_shot_prompts": list(templates),
        "classes": list(data.classes),
        "data": data.name,
    }


@register_task
class ImageTextTask(Task):
    name = "image-text"
    target = "caption"
    data_schemes = ("imagetext", "shards")
    summary_keys = ("i2t_recall_at_1", "t2i_recall_at_1", "i2t_recall_at_5", "t2i_recall_at_5")
    headline = "val_mean_recall_at_1"
    val_metrics = ("mean_recall_at_1", "i2t_recall_at_1", "t2i_recall_at_1")
    Options = ImageTextOptions
    head_model = True

    def check_data(self, data: DataSplits) -> None:
        from vitkit.data.imagetext import is_imagetext

        if not is_imagetext(data.train):
            raise VitkitError(
                f"{data.train.name}: task 'image-text' needs image-caption pairs (imagetext:, shards:)"
            )

    def check_config(self, cfg: TrainConfig) -> None:
        refuse_image_label_options(self.name, cfg, "image-caption pairs", "the CLIP contrastive loss")

    def num_outputs(self, data: DataSplits) -> int:
        return self.options.embed_dim

    def head_config(self) -> dict[str, Any]:
        o = self.options
        return {
            "head": "clip",
            "task": "image-text",
            "embed_dim": o.embed_dim,
            "context_length": o.context_length,
            "width": o.text_width,
            "heads": o.text_heads,
            "layers": o.text_layers,
        }

    def build_head(self, model: nn.Module, num_outputs: int) -> nn.Module:
        from vitkit.models.imagetext import ImageTextModel, attach_clip_head

        if isinstance(model, ImageTextModel):
            return model
        return attach_clip_head(model, self.head_config())

    def check_head(self, model: nn.Module, data: DataSplits, model_name: str) -> None:
        from vitkit.models.imagetext import ImageTextModel

        if not isinstance(model, ImageTextModel):
            raise VitkitError(f"model '{model_name}' is not an image-text model (task '{self.spec}')")

    def batch_transforms(self, cfg: TrainConfig, model: nn.Module, data: DataSplits):
        from vitkit.data import BatchTransform
        from vitkit.models import model_input_size, model_normalization
        from vitkit.train.loop import augment_config

        c, h, w = model_input_size(model)
        mean, std = model_normalization(model)
        size = cfg.img_size or (h, w)
        train_tf = BatchTransform(size, c, mean, std, train=True, augment=augment_config(cfg))
        eval_tf = BatchTransform(size, c, mean, std, train=False)
        length = model.config.context_length
        table = getattr(data.train, "info", {}).get("captions")
        return ImageTextBatchTransform(train_tf, table, length), ImageTextBatchTransform(
            eval_tf, None, length
        )

    def loss(self, cfg: TrainConfig) -> Objective:
        self.check_config(cfg)
        return ImageTextObjective()

    # -- evaluation ------------------------------------------------------------------------------
    def predict(
        self,
        model: nn.Module,
        data: ImageDataset,
        *,
        batch_size: int = 256,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        transform: Any = None,
    ) -> torch.Tensor:
        """(N, 2E): each pair's image embedding, then its caption's text embedding."""
        from vitkit.data.imagetext import captions_of
        from vitkit.models.inference import autocast_context, eval_transform

        if not hasattr(model, "encode_text"):
            raise VitkitError("task 'image-text' needs an image-text model")
        image_tf = transform.image_tf if isinstance(transform, ImageTextBatchTransform) else transform
        image_tf = image_tf or eval_transform(model)
        captions = captions_of(data)
        was = model.training
        model.eval()
        outs = []
        try:
            with torch.no_grad():
                for i in range(0, len(data), batch_size):
                    x = image_tf.images(data.images[i : i + batch_size]).to(device)
                    t = tokenize(captions[i : i + batch_size], model.config.context_length).to(device)
                    with autocast_context(device, precision):
                        img, txt, _ = model(x, t)
                    outs.append(torch.cat([img.float(), txt.float()], 1).cpu())
        finally:
            model.train(was)
        return torch.cat(outs) if outs else torch.empty(0, 0)

    def evaluate(self, model, data, out_dir=None, *, outputs=None, **kwargs) -> dict[str, Any]:
        if outputs is None:
            outputs = self.predict(
                model,
                data,
                **{k: kwargs[k] for k in ("batch_size", "device", "precision", "transform") if k in kwargs},
            )
        out = self.metrics(outputs, data.targets, captions=data.info.get("captions"))
        out["data"] = data.name
        out["classes"] = []
        if out_dir is not None:
            self.write_outputs(out, data, out_dir)
        return out

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor, **context: Any) -> dict[str, Any]:
        table = context.get("captions")
        if table is None:
            raise VitkitError("image-text metrics need the pairs' captions")
        e = outputs.shape[1] // 2
        captions = [table[int(i)] for i in targets]
        out = pair_retrieval_metrics(outputs[:, :e], outputs[:, e:], captions)
        out["task"] = self.spec
        return out

    def validate(self, model, data, transform, device, precision, batch_size) -> dict[str, Any]:
        outputs = self.predict(
            model, data, batch_size=batch_size, device=device, precision=precision, transform=transform
        )
        m = self.metrics(outputs, data.targets, captions=data.info.get("captions"))
        return {f"val_{k}": m[k] for k in self.val_metrics}

    def write_plots(self, metrics: dict[str, Any], data: ImageDataset, out_dir: Path) -> list[str]:
        return []

    def export_signature(self, model: nn.Module) -> ExportSignature:
        width = getattr(model, "embed_dim", "E")
        out = TensorSpec("image_embedding", ("B", width), "float32", "L2-normalised image embedding")
        return ExportSignature(
            (image_input(model),),
            (out,),
            "rank captions (or class prompts) by the inner product with their normalised text embeddings; "
            "the text tower is not in the graph",
        )


def write_zero_shot_plot(metrics: dict[str, Any], path: Path) -> None:
    """Per-class zero-shot accuracy as bars, top-1 in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vitkit.io import atomic_path

    classes = metrics["classes"]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(classes) + 1), 3.2))
    ax.bar(range(len(classes)), [0 if v != v else v for v in metrics["zero_shot_per_class"]])
    ax.axhline(1 / len(classes), color="gray", ls="--", lw=1, label="chance")
    ax.set_xticks(
        range(len(classes)), [readable_class_name(c) for c in classes], rotation=45, ha="right", fontsize=7
    )
    ax.set_ylim(0, 1)
    ax.set_ylabel("zero-shot accuracy")
    ax.set_title(f"{metrics['data']}: zero-shot top-1 {metrics['zero_shot_top1']:.3f}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
