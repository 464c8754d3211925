"""vitkit: train, adapt, compress, audit and deploy Vision Transformers, over timm."""

__version__ = "0.1.0"
