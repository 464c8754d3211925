"""Audit a ViT: attacks, patch robustness, representation similarity, attention, position artifacts,
multi-scale features and MIL over frozen features. Each analysis is ``measure_x(model, data, cfg)``.
Before training, :mod:`~vitkit.analyze.rank` ranks ViT configurations by As-ViT's training-free
complexity proxy (``vitkit rank-configs``)."""
