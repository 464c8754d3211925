"""``vitkit quantize``: post-training quantization of a run (simulated quantizers, see docs/quantization.md)."""

from pathlib import Path
from typing import Optional

from vitkit.cli import app
from vitkit.cli.options import Arg, Opt
from vitkit.io import check_output
from vitkit.progress import console

PRESETS = {"w8a8": (8, 8), "w6a6": (6, 6), "w4a4": (4, 4), "w3a3": (3, 3)}


@app.command(rich_help_panel="Compress")
def quantize(
    run: Path = Arg(..., help="run directory to quantize"),
    output: Path = Opt(..., "-o", "--output", help="new run directory for the quantized model"),
    method: Optional[str] = Opt(  # noqa: UP045 - typer needs typing.Optional
        None,
        help="minmax | percentile | omse | ptq4vit | repq | adalog | ias | dopq | ivit [default: minmax]",
    ),
    preset: Optional[str] = Opt(None, help="w8a8 | w6a6 | w4a4 | w3a3 (sets --w-bits and --a-bits)"),  # noqa: UP045
    w_bits: Optional[int] = Opt(None, help="weight bits, 2-16 [default: 8]"),  # noqa: UP045
    a_bits: Optional[int] = Opt(None, help="activation bits, 2-16 [default: 8]"),  # noqa: UP045
    calib: Optional[int] = Opt(None, help="calibration images [default: 128]"),  # noqa: UP045
    calib_batch: Optional[int] = Opt(None, help="calibration batch [default: 32]"),  # noqa: UP045
    w_granularity: Optional[str] = Opt(None, help="channel | tensor [default: channel]"),  # noqa: UP045
    a_granularity: Optional[str] = Opt(None, help="tensor | channel [default: tensor]"),  # noqa: UP045
    reconstruct: bool = Opt(
        False, "--reconstruct", help="AdaRound-style block reconstruction after calibration"
    ),
    recon_iters: Optional[int] = Opt(None, help="reconstruction iterations per block [default: 200]"),  # noqa: UP045
    smoothquant: bool = Opt(False, "--smoothquant", help="MPTQ-ViT SmoothQuant-with-bias before calibration"),
    mixed_precision: Optional[str] = Opt(  # noqa: UP045
        None, help="greedy | lrp | uniform: allocate per-layer bits under --avg-bits (writes bits.png)"
    ),
    avg_bits: Optional[float] = Opt(None, help="parameter-weighted average weight bits"),  # noqa: UP045
    bit_choices: Optional[str] = Opt(None, help="comma-separated bits a layer may get [default: 4,8]"),  # noqa: UP045
    seed: Optional[int] = Opt(None, help="calibration subset seed [default: 0]"),  # noqa: UP045
    deploy: Optional[str] = Opt(  # noqa: UP045
        None,
        help="onnx: also write model_int8.onnx (QDQ, onnxruntime INT8; 8-bit uniform methods only) | "
        "torch-x86: also write model_int8_x86.pt2 (PT2E + Inductor oneDNN INT8; W8A8 only)",
    ),
    force: bool = Opt(False, "--force", help="replace a non-empty output directory"),
    device: str = Opt("cpu"),
) -> None:
    """Post-training quantization of a run into a new run (simulated INT-k; writes quant.json)."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    check_output(output, "dir", force=force)
    from vitkit.errors import VitkitError
    from vitkit.stages.quantize import quantize_run

    if preset is not None:
        if preset.lower() not in PRESETS:
            raise VitkitError(f"--preset must be one of {', '.join(PRESETS)}, got '{preset}'")
        if w_bits is not None or a_bits is not None:
            raise VitkitError("--preset sets the bits: drop --w-bits/--a-bits or the preset")
        w_bits, a_bits = PRESETS[preset.lower()]
    choices = None
    if bit_choices is not None:
        try:
            choices = [int(b) for b in bit_choices.split(",")]
        except ValueError:
            raise VitkitError(
                f"--bit-choices must be comma-separated integers, got '{bit_choices}'"
            ) from None
    summary, out = quantize_run(
        run,
        output,
        force=force,
        device=device,
        deploy=deploy,
        method=method,
        w_bits=w_bits,
        a_bits=a_bits,
        calib_size=calib,
        calib_batch=calib_batch,
        w_granularity=w_granularity,
        a_granularity=a_granularity,
        reconstruct=reconstruct or None,
        recon_iters=recon_iters,
        smoothquant=smoothquant or None,
        seed=seed,
        mixed_precision=mixed_precision,
        avg_bits=avg_bits,
        bit_choices=choices,
    )
    console.print(
        f"{summary['method']} W{summary['w_bits']}A{summary['a_bits']} (simulated): top-1 "
        f"{summary['quant_top1']:.4f} vs fp32 {summary['fp32_top1']:.4f} ({summary['drop_points']:+.2f} pt drop), "
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
