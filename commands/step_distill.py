"""`neodragon step-distill RECIPE -o OUT`: step distillation of the MMDiT to a few-step schedule without
CFG (paper §3.4): methods dmd (default), progressive, adversarial, mean-flows; schedules 4-4-4, 1-1-1, any a-b-c.

The work is in `pipelines/distill/step_distill*.py`; torch and the pipelines are imported inside the
handler, so `neodragon --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer


def step_distill(
    recipe: str = typer.Argument(..., help="A step-distill recipe (shipped name, e.g. shapes/step_distill_dmd, or YAML path)."),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides, e.g. schedule=1-1-1 train.max_steps=100."),
    out: Path = typer.Option(..., "-o", "--out", help="Pipeline folder to write (the parent with the distilled MMDiT and schedule)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in OUT.work/run."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT when done."),
) -> None:
    """Distil the parent pipeline's MMDiT (the teacher, sampled with its CFG) into a student that runs the
    recipe's schedule without CFG; OUT's recorded sampling defaults become that schedule, so
    `neodragon generate --model OUT` uses it. Checkpoints of every trained model and optimizer go to
    OUT.work/run (Ctrl-C saves one; --resume continues exactly); progressive/adversarial/mean-flows first generate
    their teacher videos into OUT.work/synthetic (reused when unchanged). train.max_steps caps the student
    updates. Under `torchrun --nproc_per_node N` the ranks share each batch (train.fsdp=true shards the
    trained models); rank 0 writes the files."""
    from neodragon_cli.commands._training import run_training_recipe

    run_training_recipe("step-distill", recipe, overrides, out, resume=resume, overwrite=overwrite)


def register(app: typer.Typer) -> None:
    app.command("step-distill")(step_distill)
