"""``vitkit quantize``: post-training quantization of a run (simulated quantizers, see docs/quantization.md)."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationInfo, field_validator

from vitkit.io import check_output
from vitkit.progress import console
from vitkit.verbs import Verb, VerbOptions, argument, option, register_verb

PRESETS = {"w8a8": (8, 8), "w6a6": (6, 6), "w4a4": (4, 4), "w3a3": (3, 3)}


def _bit_choices(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise ValueError(f"--bit-choices must be comma-separated integers, got '{text}'") from None


class QuantizeOptions(VerbOptions):
    run: Path = argument(help="run directory to quantize")
    output: Path = option(..., "-o", "--output", help="new run directory for the quantized model")
    method: str | None = option(
        None,
        help="minmax | percentile | omse | ptq4vit | repq | adalog | ias | dopq | ivit [default: minmax]",
    )
    preset: str | None = option(None, help="w8a8 | w6a6 | w4a4 | w3a3 (sets --w-bits and --a-bits)")
    w_bits: int | None = option(None, help="weight bits, 2-16 [default: 8]")
    a_bits: int | None = option(None, help="activation bits, 2-16 [default: 8]")
    calib: int | None = option(None, help="calibration images [default: 128]")
    calib_batch: int | None = option(None, help="calibration batch [default: 32]")
    w_granularity: str | None = option(None, help="channel | tensor [default: channel]")
    a_granularity: str | None = option(None, help="tensor | channel [default: tensor]")
    reconstruct: bool = option(
        False, "--reconstruct", help="AdaRound-style block reconstruction after calibration"
    )
    recon_iters: int | None = option(None, help="reconstruction iterations per block [default: 200]")
    smoothquant: bool = option(
        False, "--smoothquant", help="MPTQ-ViT SmoothQuant-with-bias before calibration"
    )
    mixed_precision: str | None = option(
        None, help="greedy | lrp | uniform: allocate per-layer bits under --avg-bits (writes bits.png)"
    )
    avg_bits: float | None = option(None, help="parameter-weighted average weight bits")
    bit_choices: str | None = option(None, help="comma-separated bits a layer may get [default: 4,8]")
    seed: int | None = option(None, help="calibration subset seed [default: 0]")
    deploy: str | None = option(
        None,
        help="onnx: also write model_int8.onnx (QDQ, onnxruntime INT8; 8-bit uniform methods only) | "
        "torch-x86: also write model_int8_x86.pt2 (PT2E + Inductor oneDNN INT8; W8A8 only)",
    )
    force: bool = option(False, "--force", help="replace a non-empty output directory")
    device: str = option("cpu", help="torch device for calibration and evaluation")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str | None) -> str | None:
        if v is not None and v.lower() not in PRESETS:
            raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got '{v}'")
        return v

    @field_validator("w_bits", "a_bits")
    @classmethod
    def _not_with_a_preset(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and info.data.get("preset") is not None:
            raise ValueError("--preset sets the bits: drop --w-bits/--a-bits or the preset")
        return v

    @field_validator("bit_choices")
    @classmethod
    def _integers(cls, v: str | None) -> str | None:
        _bit_choices(v)
        return v

    @property
    def bits(self) -> tuple[int | None, int | None]:
        """(weight bits, activation bits): the preset's, else ``--w-bits``/``--a-bits``."""
        return PRESETS[self.preset.lower()] if self.preset is not None else (self.w_bits, self.a_bits)

    @property
    def choices(self) -> list[int] | None:
        """``--bit-choices`` as integers."""
        return _bit_choices(self.bit_choices)


def quantize(o: QuantizeOptions) -> None:
    """Post-training quantization of a run into a new run (simulated INT-k; writes quant.json)."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    check_output(o.output, "dir", force=o.force)
    from vitkit.stages.quantize import quantize_run

    w_bits, a_bits = o.bits
    summary, out = quantize_run(
        o.run,
        o.output,
        force=o.force,
        device=o.device,
        deploy=o.deploy,
        method=o.method,
        w_bits=w_bits,
        a_bits=a_bits,
        calib_size=o.calib,
        calib_batch=o.calib_batch,
        w_granularity=o.w_granularity,
        a_granularity=o.a_granularity,
        reconstruct=o.reconstruct or None,
        recon_iters=o.recon_iters,
        smoothquant=o.smoothquant or None,
        seed=o.seed,
        mixed_precision=o.mixed_precision,
        avg_bits=o.avg_bits,
        bit_choices=o.choices,
    )
    key = summary["metric"]
    name = {"top1": "top-1", "miou": "mIoU", "change_f1": "change F1"}.get(key, key)
    console.print(
        f"{summary['method']} W{summary['w_bits']}A{summary['a_bits']} (simulated): {name} "
        f"{summary[f'quant_{key}']:.4f} vs fp32 {summary[f'fp32_{key}']:.4f} ({summary['drop_points']:+.2f} pt drop), "
        f"calibration {summary['calibration_seconds']:.1f} s"
    )
    if "onnx_int8_top1" in summary:
        console.print(
            f"onnxruntime INT8 (model_int8.onnx): top-1 {summary['onnx_int8_top1']:.4f}, "
            f"{100 * summary['onnx_vs_simulated_agreement']:.1f}% predictions agree with the simulated model"
        )
    if "x86_reference_top1" in summary:
        console.print(
            f"PT2E INT8 (model_int8_x86.pt2): reference graph top-1 {summary['x86_reference_top1']:.4f}, "
            f"{100 * summary['x86_reference_vs_simulated_agreement']:.1f}% predictions agree with the simulated model"
        )
        if "x86_int8_top1" in summary:
            console.print(
                f"Inductor-compiled INT8 ({', '.join(summary['x86_int8_kernels'])}): top-1 {summary['x86_int8_top1']:.4f}, "
                f"{100 * summary['x86_vs_simulated_agreement']:.1f}% agree with the simulated model"
            )
        else:
            console.print(
                f"[yellow]Inductor compilation failed, reference graph only: {summary['x86_compile_error']}"
            )
    if "avg_weight_bits" in summary:
        console.print(
            f"average weight bits: {summary['avg_weight_bits']:.2f} (per-layer table in quant.json, bits.png)"
        )
    console.print(f"written: {out}/ (model.json, model.safetensors, metrics.json, quant.json, config.yaml)")


register_verb(Verb("quantize", QuantizeOptions, quantize, panel="Compress", input="run", produces=True))
