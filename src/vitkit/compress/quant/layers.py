"""Quantized layers: drop-in subclasses of the float modules, each holding its quantizers.

What changes in the model: a ``Linear`` / ``Conv2d`` becomes a :class:`QuantLinear` /
:class:`QuantConv2d` (same ``weight`` and ``bias`` parameters under the same names, plus
``weight_quantizer`` and ``input_quantizer``); the attention's ``MatMul`` and ``Softmax`` points
become :class:`QuantMatMul` (a quantizer per operand) and :class:`QuantSoftmax` (a quantizer on the
probabilities). Because they subclass the float types, code that looks for ``nn.Linear`` still finds
them, and the state-dict keys of the float weights do not change. Replacing the attention's points
switches :class:`~vitkit.models.VitkitAttention` to its explicit path automatically.

Simulated ("fake") quantization: values are quantized and dequantized in float32; no integer kernel
runs here. Real INT8 execution is ``deploy.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.compress.quant.quantizers import Quantizer
from vitkit.models.attention import MatMul, Softmax


def _q(module: Quantizer | None) -> nn.Module:
    return module if module is not None else nn.Identity()


class QuantLinear(nn.Linear):
    """``Linear`` with a weight quantizer and an input (activation) quantizer."""

    def __init__(
        self,
        source: nn.Linear,
        weight_quantizer: Quantizer | None,
        input_quantizer: Quantizer | None,
        ensure_bias: bool = False,
    ):
        nn.Module.__init__(self)
        self.in_features, self.out_features = source.in_features, source.out_features
        self.weight = source.weight
        self.bias = source.bias
        if self.bias is None and ensure_bias:  # reparameterizations fold shifts into a bias
            self.bias = nn.Parameter(
                torch.zeros(self.out_features, dtype=self.weight.dtype, device=self.weight.device)
            )
        self._weight_override = None  # block reconstruction installs a soft-rounded weight here
        self.weight_quantizer = _q(weight_quantizer)
        self.input_quantizer = _q(input_quantizer)

    def quantized_weight(self) -> torch.Tensor:
        if self._weight_override is not None:
            return self._weight_override()
        return self.weight_quantizer(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias)

    def to_float(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin.weight, lin.bias = self.weight, self.bias
        return lin


class QuantConv2d(nn.Conv2d):
    """``Conv2d`` (the patch embedding) with a weight quantizer and an input quantizer."""

    def __init__(
        self, source: nn.Conv2d, weight_quantizer: Quantizer | None, input_quantizer: Quantizer | None
    ):
        nn.Module.__init__(self)
        for attr in (
            "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
            "transposed", "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice",
        ):  # fmt: skip
            setattr(self, attr, getattr(source, attr))
        self.weight = source.weight
        self.bias = source.bias
        self.weight_quantizer = _q(weight_quantizer)
        self.input_quantizer = _q(input_quantizer)
        self._weight_override = None

    def quantized_weight(self) -> torch.Tensor:
        if self._weight_override is not None:
            return self._weight_override()
        return self.weight_quantizer(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.quantized_weight(), self.bias)


class QuantMatMul(MatMul):
    """``a @ b`` with a quantizer on each operand (q and kᵀ, or probabilities and v)."""

    def __init__(self, a_quantizer: Quantizer | None, b_quantizer: Quantizer | None):
        super().__init__()
        self.a_quantizer = _q(a_quantizer)
        self.b_quantizer = _q(b_quantizer)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.a_quantizer(a) @ self.b_quantizer(b)


class QuantSoftmax(Softmax):
    """Softmax whose output (the attention probabilities) is quantized."""

    def __init__(self, output_quantizer: Quantizer | None, dim: int = -1):
        super().__init__(dim=dim)
        self.output_quantizer = _q(output_quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quantizer(x.softmax(dim=self.dim))


QUANT_LAYERS = (QuantLinear, QuantConv2d, QuantMatMul, QuantSoftmax)


def quantizers_of(module: nn.Module) -> dict[str, Quantizer]:
    """The quantizers of a quantized layer by slot name (``weight``, ``input``, ``a``, ``b``, ``output``)."""
    slots = {
        "weight": "weight_quantizer",
        "input": "input_quantizer",
        "a": "a_quantizer",
        "b": "b_quantizer",
        "output": "output_quantizer",
    }
    out = {}
    for slot, attr in slots.items():
        q = getattr(module, attr, None)
        if isinstance(q, Quantizer):
            out[slot] = q
    return out
