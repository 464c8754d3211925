"""Real INT8 on x86 CPUs through PyTorch 2 Export (PT2E) quantization: torchao's
``X86InductorQuantizer`` (the maintained home of PT2E since ``torch.ao.quantization`` was removed from
torch), then ``torch.compile`` (Inductor), which lowers the quantize/dequantize patterns around
linear, conv and matmul to oneDNN INT8 kernels (``onednn.qlinear_pointwise`` and friends).

What changes: nothing in the vitkit model. :func:`pt2e_int8` exports a copy of the FLOAT model with
the attention unfused (``force_unfused``, so both attention matmuls are quantized too), annotates it
with the x86 recipe (activations uint8 per tensor with histogram observers, weights int8 per output
channel, symmetric), calibrates on the calibration images and converts it. The result is a
*reference* graph (quantize/dequantize ops around float ops, the same numbers the INT8 kernels
compute); :func:`compile_int8` hands it to Inductor with ``freezing`` so that the INT8 kernels run.

Our choices / what differs from vitkit's simulated quantizers: the scales come from torchao's
observers on the same calibration images, not from the vitkit method's calibration (RepQ, OMSE, ...
scales are not transferred), so the deployed graph is compared to the simulated W8A8 model by
prediction agreement, not bit for bit. ``reduce_range`` (7-bit activations, 0..127) is switched on
automatically on CPUs without VNNI: there oneDNN multiplies u8 x s8 with ``vpmaddubsw``, whose int16
pair sums saturate with full-range activations; on this AVX2-only EPYC the full range moved the
compiled logits by up to 2.0 and cost 2 pt top-1 on the digits model, 7 bits matched the reference
graph (max |Δlogit| 0.05).

The converted program is saved with ``torch.export.save`` (a ``.pt2`` archive: raw tensors, JSON and a
small sample-inputs file that loads with ``weights_only=True``) and loaded with :func:`load_int8_program`,
which refuses archives that would make ``torch.export.load`` unpickle, load native code or evaluate
Python (see :mod:`vitkit.compress.quant.pt2_safety`). torchao is imported lazily: vitkit imports without it.
"""

from __future__ import annotations

import copy
import io
import os
from pathlib import Path

import torch
from torch import nn

from vitkit.errors import VitkitError

PROGRAM_FILE = "model_int8_x86.pt2"
MAX_BATCH = 4096


def _torchao():
    try:
        import torchao.quantization.pt2e.inductor_passes.x86  # noqa: F401 - registers the INT8 lowerings
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError as e:
        raise VitkitError(f"the torch-x86 INT8 back end needs torchao (pip install torchao): {e}") from None
    return prepare_pt2e, convert_pt2e, xiq


def has_vnni() -> bool:
    """True when the CPU has VNNI (u8 x s8 dot products without int16 saturation)."""
    probe = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(probe()) if probe is not None else False


def _export(model: nn.Module, example: torch.Tensor):
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


@torch.no_grad()
def pt2e_int8(
    model: nn.Module,
    images: torch.Tensor,
    *,
    reduce_range: bool | None = None,
    batch: int = 32,
) -> torch.fx.GraphModule:
    """The PT2E-converted INT8 reference graph of ``model`` calibrated on ``images`` (N, C, H, W)."""
    from vitkit.models.attention import attention_modules

    prepare_pt2e, convert_pt2e, xiq = _torchao()
    if images.ndim != 4 or len(images) == 0:
        raise VitkitError(
            f"calibration images must be a non-empty N x C x H x W tensor, got {tuple(images.shape)}"
        )
    float_model = copy.deepcopy(model).eval()
    for attn in attention_modules(float_model):
        attn.force_unfused = True  # q@k^T and attn@v as matmuls the quantizer can annotate
    quantizer = xiq.X86InductorQuantizer()
    rr = (not has_vnni()) if reduce_range is None else reduce_range
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(reduce_range=rr))
    try:
        exported = _export(float_model, images[: min(batch, len(images))]).module()
    except Exception as e:  # export failures have many types; name the cause in one line
        raise VitkitError(
            f"torch.export could not trace this model for PT2E INT8 ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "use --deploy onnx or keep it simulated"
        ) from None
    prepared = prepare_pt2e(exported, quantizer)
    for i in range(0, len(images), batch):
        prepared(images[i : i + batch])
    converted = convert_pt2e(prepared)
    converted.meta["vitkit_reduce_range"] = rr
    return converted


class CompiledInt8(nn.Module):
    """A PT2E program compiled by Inductor with freezing, so the quantized patterns run as INT8 kernels.

    ``bf16=True`` is PT2E's *int8-mixed-bf16* recipe: the call runs under bf16 autocast, so the INT8
    kernels hand bf16 to the ops that stay float (LayerNorm, softmax, GELU, the attention matmuls),
    which then run on the CPU's bf16 units (AMX / AVX512-BF16); without them it is slower, not faster.

    Inductor's ``freezing`` is switched on with a config patch around each call: passed as
    ``torch.compile(options={"freezing": True})`` it failed here (``UnsupportedOperatorException:
    onednn.qconv_prepack`` under fake tensors, torch 2.14.1 / torchao 0.18.0). Compilation happens on
    the first call (tens of seconds on 2 cores; cached on disk afterwards)."""

    def __init__(self, program: nn.Module, bf16: bool = False):
        super().__init__()
        self.program = program
        self.bf16 = bf16
        self.compiled = torch.compile(program)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config

        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16)
        with torch.no_grad(), inductor_config.patch(freezing=True), autocast:
            return self.compiled(x).float()


def compile_int8(program: torch.fx.GraphModule | nn.Module, bf16: bool = False) -> CompiledInt8:
    """``program`` compiled by Inductor so its INT8 kernels run (see :class:`CompiledInt8`)."""
    return CompiledInt8(program, bf16=bf16)


def int8_kernels(compiled: nn.Module, x: torch.Tensor) -> list[str]:
    """The oneDNN INT8 kernel names in the code Inductor generates for ``compiled(x)`` (compiles it)."""
    import re

    from torch._inductor.utils import run_and_get_code

    _, code = run_and_get_code(compiled, x)
    return sorted(set(re.findall(r"onednn\.(q\w+)", "\n".join(code))))


def save_int8_program(program: torch.fx.GraphModule, path: str | os.PathLike, example: torch.Tensor) -> Path:
    """``torch.export.save`` of the converted program (dynamic batch), written atomically."""
    from vitkit.io import atomic_path

    with torch.no_grad():
        ep = _export(program, example[:2] if len(example) > 1 else example)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return Path(path)


def load_int8_program(path: str | os.PathLike, *, compile: bool = True, bf16: bool = False) -> nn.Module:
    """The saved INT8 program (compiled with Inductor unless ``compile=False``; ``bf16``: the
    int8-mixed-bf16 recipe, see :class:`CompiledInt8`)."""
    _torchao()  # registers the quantized ops' lowerings before the graph is compiled
    if not Path(path).is_file():
        raise VitkitError(
            f"'{path}' not found: expected a {PROGRAM_FILE} written by vitkit quantize --deploy torch-x86"
        )
    from vitkit.compress.quant.pt2_safety import check_pt2_archive

    data = Path(path).read_bytes()
    # torch.export.load can unpickle, load native code and eval strings from the archive: inspect
    # it first, then hand torch the very bytes that were inspected (no second read of the file).
    check_pt2_archive(data, path)
    try:
        program = torch.export.load(io.BytesIO(data)).module()
    except Exception as e:
        raise VitkitError(f"'{path}' is not a torch.export program ({type(e).__name__})") from None
    return compile_int8(program, bf16=bf16) if compile else program
