"""The training configuration lives in :mod:`vitkit.config.train` (torch-free, so ``--help`` is fast)."""

from vitkit.config.train import TrainConfig, build_config, format_validation_error, read_config_file

__all__ = ["TrainConfig", "build_config", "format_validation_error", "read_config_file"]
