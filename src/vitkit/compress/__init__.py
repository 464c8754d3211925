"""Compression: transforms that make a trained ViT smaller or faster (token reduction, early exits,
FFN reparameterization, pruning, linear attention; quantization lives in ``compress.quant``).

Each technique is a model transform recorded in the manifest (see ``vitkit.registry``); import the
submodule you need, e.g. ``from vitkit.compress.tokens import apply_tome``.
"""
