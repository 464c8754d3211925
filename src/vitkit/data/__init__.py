"""Data: dataset URIs, in-memory datasets, deterministic splits, batch transforms."""

from vitkit.data.dataset import DataSplits, ImageDataset
from vitkit.data.sources import VitkitDataWarning, build_mosaic
from vitkit.data.splits import (
    limit_size,
    load_eval_data,
    load_splits,
    longtail_counts,
    longtail_subset,
    stratified_split,
)
from vitkit.data.transforms import AugmentConfig, BatchTransform, DenseBatchTransform, seed_everything
from vitkit.data.uris import load_source, parse_uri

__all__ = [
    "AugmentConfig",
    "BatchTransform",
    "DataSplits",
    "DenseBatchTransform",
    "ImageDataset",
    "VitkitDataWarning",
    "build_mosaic",
    "limit_size",
    "load_eval_data",
    "load_source",
    "load_splits",
    "longtail_counts",
    "longtail_subset",
    "parse_uri",
    "seed_everything",
    "stratified_split",
]
