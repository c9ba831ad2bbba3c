"""`neodragon prune`: MMDiT block pruning (paper §3.3).

    neodragon prune scores MODEL -o REPORT_DIR [--prompts FILE] [--videos-per-prompt N]
    neodragon prune guidance MODEL -o REPORT_DIR [--prompts FILE] [--videos-per-prompt N] [--max-prompts N] [--steps S]
    neodragon prune RECIPE [key=value ...] -o OUT [--resume] [--overwrite]   (= `prune run RECIPE`)

The work is in `pipelines/distill/prune.py`, `block_importance.py` and `drop_one.py`; torch and the pipelines are
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
    _print_correlation(report)
    console.print(f"wrote {out / 'scores.json'} and {out / 'block_importance.png'}")


def _print_correlation(report: dict) -> None:
    from neodragon_cli.console import console

    corr = report["rank_correlation"]
    rho = "undefined" if corr["spearman_visual_text"] is None else f"{corr['spearman_visual_text']:+.3f}"
    console.print(f"Spearman rank correlation of visual and text scores over {corr['blocks']} blocks: {rho}")


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


@prune_app.command("guidance")
def guidance(
    model: str = typer.Argument(..., help="A pipeline folder or an embedded model's name."),
    out: Path = typer.Option(..., "-o", "--out", help="Report folder: a `prune scores` folder to add to, or a new one."),
    prompts: Path = typer.Option(None, "--prompts", help="Calibration prompts (one per line, or .jsonl/.csv/.parquet); default: Shapes captions."),
    videos_per_prompt: int = typer.Option(1, "--videos-per-prompt", min=1, help="Videos generated per prompt and variant."),
    max_prompts: int = typer.Option(10, "--max-prompts", min=1, help="Use only the first N calibration prompts."),
    steps: str = typer.Option(None, "--steps", help="Euler steps per stage, e.g. 4-4-4 (default: the model's)."),
    frames: int = typer.Option(None, "--frames", help="Video frames, 1 + 8k (default: the model's)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the calibration videos."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Measure again into a folder that already holds drop-one numbers."),
) -> None:
    """Drop-one guidance (paper Fig. 8, automated): generate the calibration videos without each block
    in turn, write a contact sheet per prompt, score every variant with the eval judge and with its
    PSNR / SSIM to the full model's video of the same seed, and merge the numbers into scores.json
    (for `blocks.policy=guided`)."""
    from neodragon_cli.console import console, progress
    from neodragon_cli.errors import UsageError
    from neodragon_cli.pipelines.distill.drop_one import measure_drop_one
    from neodragon_cli.pipelines.distill.prune import CalibrationSection, calibration_prompts
    from neodragon_cli.pipelines.flow.scheduler import parse_steps
    from neodragon_cli.pipelines.flow.settings import GenerationSettings

    try:
        per_stage = list(parse_steps(steps)) if steps is not None else None
    except ValueError as exc:
        raise UsageError(f"--steps: {exc}") from None
    settings = GenerationSettings(first_steps=per_stage, video_steps=per_stage, frames=frames)
    problems = settings.validate()
    if problems:
        raise UsageError(problems[0])
    texts = calibration_prompts(CalibrationSection(prompts=str(prompts or ""), seed=seed))[:max_prompts]
    with progress() as bar:
        task = bar.add_task("full model", total=len(texts) * videos_per_prompt)
        report = measure_drop_one(
            model, texts, videos_per_prompt=videos_per_prompt, seed=seed, report_dir=out, settings=settings,
            overwrite=overwrite, progress=lambda name, done, total: bar.update(task, description=name, completed=done),
            log=console.print,
        )
    full = report["drop_one"]["full_model"]
    console.print(f"full model: Total {_fmt(full['total'])}  {full['seconds_per_video']:.2f} s per video "
                  f"(CPU {full['cpu_seconds_per_video']:.2f} s)")
    for block in report["blocks"]:
        drop = block["drop_one"]
        if drop is None:
            continue
        console.print(f"without block {block['block']:3d}: PSNR {drop['psnr']:6.2f} dB  SSIM {_fmt(drop['ssim'])}  "
                      f"Total {_fmt(drop['total'])} ({_fmt(drop['total_drop'], '+.4f')} lost)")
    _print_correlation(report)
    console.print(f"wrote {out / 'scores.json'}, {out / 'block_importance.png'} and "
                  f"{len(report['drop_one']['sheets'])} contact sheets in {out / 'drop_one'}")


def register(app: typer.Typer) -> None:
    app.add_typer(prune_app, name="prune")
