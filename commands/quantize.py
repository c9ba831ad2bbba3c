"""`neodragon quantize EXPORTED -o OUT`: post-training quantization of exported graphs (W8A16 + AdaRound),
SQNR per module, QNN HTP check, end-to-end video comparison."""

from __future__ import annotations

from pathlib import Path

import typer


def quantize(
    exported: Path = typer.Argument(..., help="An export artifact (`neodragon export MODEL -o EXPORTED`)."),
    out: Path = typer.Option(..., "-o", "--out", help="Artifact folder to write (QDQ graphs, encodings, quantize.json)."),
    scheme: str = typer.Option("w8a16", "--scheme", help="w8a16, w8a8 or fp16 for every graph but the text encoders and ContextAdapter (fp16)."),
    per_module: list[str] = typer.Option(None, "--per-module", help="SCHEME=MODULES (graph names, groups text/mmdit/decoder/vae or patterns), repeatable."),
    adaround: str = typer.Option(None, "--adaround", help="MODULES to AdaRound, or none (default: sr, when the export has it)."),
    adaround_iterations: int = typer.Option(1000, "--adaround-iterations", help="AdaRound optimisation steps per layer."),
    calibration: int = typer.Option(None, "--calibration", help="Calibration inputs per graph (default: the paper's 50 VAE, 300 per MMDiT stage, 500 SR)."),
    backend: str = typer.Option("aimet", "--backend", help="aimet (aimet-onnx), ort (ONNX Runtime QNN QDQ tools) or aimet-torch (extra)."),
    prompts: Path = typer.Option(None, "--prompts", help="Prompt file (one per line, or .jsonl/.csv/.parquet); the last is held out. Default: Shapes captions."),
    videos: int = typer.Option(4, "--videos", help="At most this many calibration videos (fewer when every graph has its inputs)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the calibration videos (held-out: seed + 1000)."),
    calibration_data: Path = typer.Option(None, "--calibration-data", help="Use inputs saved by --save-calibration instead of generating."),
    save_calibration: Path = typer.Option(None, "--save-calibration", help="Save the recorded inputs here (reuse with --calibration-data)."),
    heldout_samples: int = typer.Option(50, "--heldout-samples", help="Held-out inputs per graph for the SQNR table."),
    qnn: bool = typer.Option(True, "--qnn/--no-qnn", help="Load every graph on the QNN HTP backend (simulator on x86-64) with CPU fallback disabled."),
    qnn_samples: int = typer.Option(1, "--qnn-samples", help="Held-out inputs run on HTP per graph (compared with the CPU EP)."),
    qnn_context: bool = typer.Option(False, "--qnn-context", help="Also write EP context binaries (qnn_context/<graph>_ctx.onnx + .bin)."),
    htp_arch: str = typer.Option("79", "--htp-arch", help="HTP architecture the graphs are checked (and context binaries built) for."),
    soc_model: str = typer.Option("69", "--soc-model", help="QNN SoC model id for the HTP check and the context binaries."),
    end_to_end: bool = typer.Option(True, "--e2e/--no-e2e", help="Generate the held-out prompt with the quantized graphs and compare with the float video."),
    threads: int = typer.Option(1, "--threads", help="ONNX Runtime threads per session."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT when done."),
) -> None:
    """Quantize the graphs of an export with calibration inputs recorded from real generations, report
    each graph's SQNR against the float graph on held-out inputs, check every graph runs on the QNN HTP
    backend with CPU fallback disabled (exit 2 naming the nodes that do not), and compare the quantized
    pipeline's video with the float one. Exit 2 on bad input, before anything is written."""
    from neodragon_cli.artifacts import check_output_dir
    from neodragon_cli.console import console, progress
    from neodragon_cli.errors import UsageError
    from neodragon_cli.pipelines.deploy.quantize import (
        CalibrationSource,
        QuantizeSettings,
        plan_quantization,
        quantize_export,
        read_export,
    )

    manifest = read_export(exported)
    check_output_dir(out, overwrite)
    if calibration_data is not None and (prompts is not None or save_calibration is not None):
        raise UsageError("--calibration-data replaces recording: leave out --prompts and --save-calibration")
    for name, value in (("--heldout-samples", heldout_samples), ("--qnn-samples", qnn_samples), ("--threads", threads)):
        if value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}")
    if qnn_context and not qnn:
        raise UsageError("--qnn-context needs the QNN check (leave out --no-qnn)")
    plan = plan_quantization(list(manifest["graphs"]), scheme=scheme, per_module=per_module, adaround=adaround,
                             calibration=calibration, backend=backend, adaround_iterations=adaround_iterations)  # fmt: skip
    source = CalibrationSource(prompts=prompts, seed=seed, max_videos=videos, data=calibration_data, save=save_calibration)
    settings = QuantizeSettings(threads=threads, heldout_samples=heldout_samples, qnn=qnn, qnn_samples=qnn_samples,
                                qnn_context=qnn_context, htp_arch=htp_arch, soc_model=soc_model, end_to_end=end_to_end)  # fmt: skip
    for note in plan.notes:
        console.print(f"note: {note}", highlight=False)
    bar = progress()
    tasks = {}

    def videos_done(label: str, done: int, total: int) -> None:
        if label not in tasks:
            tasks[label] = bar.add_task(label, total=total)
        bar.update(tasks[label], completed=done, total=total)

    with bar:
        report = quantize_export(exported, out, plan, source, settings, overwrite=overwrite, video_progress=videos_done,
                                 progress=lambda text: bar.console.print(text, highlight=False))  # fmt: skip
    console.print(report_table(report))
    e2e = report["end_to_end"]
    if isinstance(e2e, dict):
        console.print(f"end to end (held-out prompt, seed {e2e['seed']}): quantized vs float video "
                      f"SQNR {e2e['sqnr_db']:.1f} dB, PSNR {e2e['psnr_db']:.1f} dB", highlight=False)  # fmt: skip
    console.print(f"wrote {out}", highlight=False)


def report_table(report: dict):
    """Table 9 shaped: graph, scheme, calibration inputs, SQNR vs float, QNN HTP."""
    from rich.table import Table

    table = Table(title="quantized graphs (SQNR vs the float graph on held-out inputs)")
    for column in ("graph", "scheme", "calibration", "SQNR dB", "QNN HTP", "HTP vs CPU dB"):
        table.add_column(column, justify="right" if column not in ("graph", "scheme", "QNN HTP") else "left")
    for name, entry in report["graphs"].items():
        scheme = entry["scheme"] + (" + AdaRound" if entry.get("adaround") else "")
        used = entry["calibration"]["used"]
        sqnr = "-" if entry["sqnr_db"] is None else f"{entry['sqnr_db']:.1f}"
        check = entry.get("qnn_htp")
        htp = "not run" if check is None else ("100% on HTP" if check["loaded"] else "refused")
        versus = "-" if not check or check["sqnr_vs_cpu_db"] is None else f"{check['sqnr_vs_cpu_db']:.1f}"
        table.add_row(name, scheme, str(used) if used else "-", sqnr, htp, versus)
    return table


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize)
