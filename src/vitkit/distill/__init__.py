"""Distillation: DeiT token distillation, DeiT-LT, feature distillation (G2SD generic stage, ScaleKD)."""
