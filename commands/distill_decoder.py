"""`neodragon distill-decoder RECIPE -o OUT`: asymmetric decoder distillation (paper §3.2), families
taehv-8x / causal-narrow.

The work is in `pipelines/distill/distill_decoder.py`; torch and the pipelines are imported inside the
handler, so `neodragon --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer


def distill_decoder(
    recipe: str = typer.Argument(..., help="A distill-decoder recipe (shipped name, e.g. shapes/distill_decoder, or YAML path)."),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides, e.g. decoder.family=causal-narrow train.max_steps=100."),
    out: Path = typer.Option(..., "-o", "--out", help="Pipeline folder to write (the parent with the new decoder)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in OUT.work/."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT when done."),
) -> None:
    """Keep the parent pipeline's VAE encoder frozen and train a light decoder on its latents
    (MSE + LPIPS or a named substitute). The encoder latents of the training clips are cached once in
    OUT.work/latents.safetensors; checkpoints go to OUT.work/run (Ctrl-C saves one; --resume continues
    exactly). Under `torchrun --nproc_per_node N` the ranks share each batch; rank 0 writes the files."""
    from neodragon_cli.commands._training import run_training_recipe

    run_training_recipe("distill-decoder", recipe, overrides, out, resume=resume, overwrite=overwrite)


def register(app: typer.Typer) -> None:
    app.command("distill-decoder")(distill_decoder)
