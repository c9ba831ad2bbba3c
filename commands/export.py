"""`neodragon export MODEL -o OUT`: static ONNX graphs of a video pipeline, validated against PyTorch."""

from __future__ import annotations

from pathlib import Path

import typer


def export(
    model: str = typer.Argument(..., help="Pipeline folder, or an embedded model's name (e.g. shapes-teacher)."),
    out: Path = typer.Option(..., "-o", "--out", help="Artifact folder to write (ONNX graphs + export.json)."),
    components: str = typer.Option("all", "--components", help="all, or a comma list of text, context_adapter, mmdit, vae_encoder, decoder, sr."),
    height: int = typer.Option(None, "--height", help="Video height in pixels (default: the model's)."),
    width: int = typer.Option(None, "--width", help="Video width in pixels (default: the model's)."),
    frames: int = typer.Option(None, "--frames", help="Video frames, 1 + 8k: the stage graphs are padded for this length (default: the model's)."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset."),
    mask_fill: float = typer.Option(-100.0, "--mask-fill", help="Finite additive value for masked attention (replaces -inf / -3.4e38)."),
    min_sqnr: float = typer.Option(60.0, "--min-sqnr", help="Validation tolerance: every output's SQNR vs PyTorch in dB."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT when done."),
) -> None:
    """Export MODEL as static graphs (one MMDiT graph per pyramid stage with padded history, text
    encoders, ContextAdapter, VAE encoder, streaming decoder, QuickSRNet), run each in ONNX Runtime
    on inputs recorded from a PyTorch run and compare. Exit 1 when a graph is off by more than
    --min-sqnr (nothing is written); exit 2 on bad input."""
    from neodragon_cli.artifacts import check_output_dir, resolve_model
    from neodragon_cli.console import console
    from neodragon_cli.errors import UsageError

    source = resolve_model(model)
    check_output_dir(out, overwrite)
    given = [v for v in (height, width, frames) if v is not None]
    if given and len(given) != 3:
        raise UsageError("give all of --height, --width and --frames, or none (the model's defaults)")

    from neodragon_cli.pipelines.deploy.export import Geometry, export_pipeline

    geometry = Geometry(height, width, frames) if given else None
    manifest = export_pipeline(
        source, out, components=components, geometry=geometry, opset=opset, fill=mask_fill, min_sqnr_db=min_sqnr,
        overwrite=overwrite, progress=lambda name: console.print(f"exporting {name}", highlight=False),
    )  # fmt: skip
    for name, entry in manifest["graphs"].items():
        worst = min(o["sqnr_db"] for o in entry["validation"]["outputs"].values())
        shapes = " ".join("x".join(map(str, i["shape"])) for i in entry["inputs"][:2])
        console.print(f"  {name:16s} {entry['bytes'] / 2**20:7.2f} MiB  {worst:6.1f} dB  in: {shapes}", highlight=False)
    g = manifest["geometry"]
    console.print(f"wrote {out}: {len(manifest['graphs'])} graphs for {g['frames']}x{g['height']}x{g['width']}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("export")(export)
