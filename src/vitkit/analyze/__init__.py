"""Audit a ViT: attacks, patch robustness, representation similarity, attention, position artifacts,
multi-scale features and MIL over frozen features. Each analysis is ``measure_x(model, data, cfg)``."""
