"""Data verbs: ``vitkit make-pool`` (a generated image-text pool with known noise) and ``vitkit
filter`` (DataComp's baseline filters over an image-text pool)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from vitkit.io import check_output
from vitkit.progress import console
from vitkit.verbs import Verb, VerbOptions, argument, option, register_verb


class FilterOptions(VerbOptions):
    short: ClassVar[dict[str, str]] = {"output": "-o"}

    pool: Path = argument(help="the pool: a CSV of image paths and captions")
    output: Path = option(..., help="the filtered CSV to write (a .json report is written beside it)")
    by: str = option(
        "clip-score", help="none | clip-score | text | image-cluster; join with + for the intersection"
    )
    top: float = option(0.3, help="clip-score: the fraction of pairs to keep (highest scores)")
    scorer: Path | None = option(
        None, help="clip-score, image-cluster: the image-text run that embeds the pairs"
    )
    target: str | None = option(None, help="text, image-cluster: the labelled dataset URI the data is for")
    clusters: int = option(50, help="image-cluster: k-means centres over the pool's image embeddings")
    seed: int = option(0, help="seed of k-means and of the target sample")


def filter_cmd(o: FilterOptions) -> None:
    """Filter an image-text pool with DataComp's baselines (CLIP score, text, image clusters)."""
    check_output(o.output, "file")
    from vitkit.stages.filter import filter_pool

    r = filter_pool(
        o.pool, o.output, o.by, top=o.top, scorer=o.scorer, target=o.target, clusters=o.clusters, seed=o.seed
    )
    console.print(f"filter {r['by']}: kept {r['kept']} of {r['rows']} pairs ({r['kept_fraction']:.1%})")
    if "noise_after" in r:
        console.print(f"noise before: {r['noise_before']}  after: {r['noise_after']}")
    console.print(f"written: {o.output} and {Path(o.output).with_suffix('.json')}")


class MakePoolOptions(VerbOptions):
    short: ClassVar[dict[str, str]] = {"output": "-o"}

    output: Path = option(..., help="folder to write pool.csv and images/ (and shards/) into")
    size: int = option(10000, help="pairs in the pool, duplicates included")
    corrupt: float = option(0.4, help="fraction of captions corrupted (half another class's, half garbled)")
    duplicates: float = option(0.1, help="fraction of the pool that repeats another pair exactly")
    off_target: float = option(0.2, help="fraction of the images that are digits instead of Fashion-MNIST")
    shards: int = option(0, help="also write the pairs as this many webdataset tar shards")
    seed: int = option(0, help="seed")
    force: bool = option(False, "--force", help="write into a non-empty folder")


def make_pool_cmd(o: MakePoolOptions) -> None:
    """Generate an image-text pool of Fashion-MNIST and digit images with templated, partly corrupted captions."""
    check_output(o.output, "dir", force=o.force)
    from vitkit.data.pool import write_pool

    path = write_pool(
        o.output,
        o.size,
        corrupt=o.corrupt,
        duplicates=o.duplicates,
        off_target=o.off_target,
        seed=o.seed,
        shards=o.shards,
    )
    console.print(f"written: {path} ({o.size} pairs){' and shards/' if o.shards else ''}")


register_verb(Verb("filter", FilterOptions, filter_cmd, panel="Data"))
register_verb(Verb("make-pool", MakePoolOptions, make_pool_cmd, panel="Data"))
