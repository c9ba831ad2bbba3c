"""`neodragon convert ARTIFACT -o OUT --dtype fp16`: the same artifact with its weights in another dtype."""

from __future__ import annotations

from pathlib import Path

import typer


def convert(
    artifact: str = typer.Argument(..., help="Artifact folder, or an embedded model's name."),
    out: Path = typer.Option(..., "-o", "--out", help="Artifact folder to write."),
    dtype: str = typer.Option(..., "--dtype", help="fp16 | bf16 | fp32: the dtype every floating weight is stored in."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT when done."),
) -> None:
    """Copy ARTIFACT with every floating tensor of its safetensors files stored as DTYPE (how the
    embedded default ships: fp16). The new artifact's chain records the conversion and its parent."""
    from neodragon_cli.artifacts import check_output_dir, resolve_model
    from neodragon_cli.console import console
    from neodragon_cli.errors import UsageError

    from neodragon_cli.pipelines.convert import DTYPES, convert_artifact

    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype '{dtype}'", hint=f"use one of {', '.join(DTYPES)}")
    source = resolve_model(artifact)
    check_output_dir(out, overwrite)
    results = convert_artifact(source, out, dtype, overwrite=overwrite)
    mib = 2**20
    console.print(
        f"wrote {out}: {results['tensors_cast']} tensors as {dtype} in {len(results['weight_files'])} files,"
        f" {results['bytes_before'] / mib:.1f} MiB -> {results['bytes_after'] / mib:.1f} MiB",
        highlight=False, soft_wrap=True,
    )


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
