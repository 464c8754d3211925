"""Compression techniques: quantization (``compress.quant``), and others added by later issues."""
