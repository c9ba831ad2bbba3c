"""`neodragon distill-te RECIPE -o OUT`: text-encoder distillation (paper §3.1), modes rm / em / lora / tdt5.

The work is in `pipelines/distill/distill_te.py`; torch and the pipelines are imported inside the
handler, so `neodragon --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer


def distill_te(
    recipe: str = typer.Argument(..., help="A distill-te recipe (shipped name, e.g. shapes/distill_te, or YAML path)."),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides, e.g. mode=lora train.max_steps=100."),
    out: Path = typer.Option(..., "-o", "--out", help="Pipeline folder to write (the parent with the distilled text path)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in OUT.work/."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT when done."),
) -> None:
    """Distil the parent pipeline's text path CE(T5(prompt)) into a DistilT5 student (+ ContextAdapter).
    The teacher's outputs are cached once in OUT.work/teacher_cache; checkpoints go to OUT.work/run
    (Ctrl-C saves one; --resume continues exactly). Under `torchrun --nproc_per_node N` the ranks share
    each batch; rank 0 writes the files."""
    from neodragon_cli.commands._training import run_training_recipe

    run_training_recipe("distill-te", recipe, overrides, out, resume=resume, overwrite=overwrite)


def register(app: typer.Typer) -> None:
    app.command("distill-te")(distill_te)
