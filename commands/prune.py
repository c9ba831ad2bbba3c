"""`neodragon prune`: MMDiT block pruning (paper §3.3).

    neodragon prune scores MODEL -o REPORT_DIR [--prompts FILE] [--videos-per-prompt N]
    neodragon prune RECIPE [key=value ...] -o OUT [--resume] [--overwrite]   (= `prune run RECIPE`)

The work is in `pipelines/distill/prune.py` and `block_importance.py`; torch and the pipelines are
imported inside the handlers, so `neodragon --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer
from typer.core import TyperGroup


class _RecipeByDefault(TyperGroup):
    """`prune RECIPE ...` runs the `run` subcommand: a first argument that names no subcommand is a recipe."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().resolve_command(ctx, args)


prune_app = typer.Typer(
    cls=_RecipeByDefault, no_args_is_help=True,
    help="MMDiT block pruning: importance scores, then removal with Stage-1 / Stage-2 recovery (`prune RECIPE -o OUT`).",
)


@prune_app.command("run")
def run(
    recipe: str = typer.Argument(..., help="A prune recipe (shipped name, e.g. shapes/prune, or YAML path)."),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides, e.g. blocks.explicit=[1,2] train.max_steps=10."),
    out: Path = typer.Option(..., "-o", "--out", help="Pipeline folder to write (the parent with the pruned MMDiT)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoints in OUT.work/."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT when done."),
) -> None:
    """Remove MMDiT blocks chosen by the recipe's policy, then recover: Stage 1 (data flow matching) and
    Stage 2 (distillation from the unpruned teacher). Checkpoints go to OUT.work/stage{1,2} (Ctrl-C saves
    one; --resume continues exactly); train.max_steps caps each stage. Under `torchrun --nproc_per_node N`
    the ranks share each batch; rank 0 writes the files."""
    from neodragon_cli.commands._training import run_training_recipe

    run_training_recipe("prune", recipe, overrides, out, resume=resume, overwrite=overwrite)


@prune_app.command("scores")
def scores(
    model: str = typer.Argument(..., help="A pipeline folder or an embedded model's name."),
    out: Path = typer.Option(..., "-o", "--out", help="Report folder: scores.json and block_importance.png."),
    prompts: Path = typer.Option(None, "--prompts", help="Calibration prompts (one per line, or .jsonl/.csv/.parquet); default: 100 Shapes captions."),
    videos_per_prompt: int = typer.Option(5, "--videos-per-prompt", min=1, help="Videos generated per prompt."),
    seed: int = typer.Option(0, "--seed", help="Seed of the calibration videos."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty report folder."),
) -> None:
    """Block importance BI = 1 - E[cos(input, output)] of every MMDiT block, for visual and text tokens,
    over every denoising step of videos generated from the calibration prompts (both CFG passes)."""
    from neodragon_cli.artifacts import check_output_dir
    from neodragon_cli.console import console
    from neodragon_cli.pipelines.distill.prune import CalibrationSection, calibration_prompts, measure_scores

    check_output_dir(out, overwrite)
    texts = calibration_prompts(CalibrationSection(prompts=str(prompts or ""), seed=seed))
    report = measure_scores(model, texts, videos_per_prompt, seed, out)
    for block in report["blocks"]:
        text = "-" if block["text"] is None else f"{block['text']:.4f}"
        console.print(f"block {block['block']:3d}  visual {block['visual']:.4f}  text {text}")
    console.print(f"wrote {out / 'scores.json'} and {out / 'block_importance.png'}")


def register(app: typer.Typer) -> None:
    app.add_typer(prune_app, name="prune")
