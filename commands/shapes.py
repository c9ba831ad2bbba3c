"""`neodragon shapes sample|prompts`: dump Shapes-world clips with their captions, or prompt corpora."""

from __future__ import annotations

from pathlib import Path

import typer

from neodragon_cli.errors import ArtifactError, UsageError
from neodragon_cli.paths import check_creatable, check_output_file

shapes_app = typer.Typer(help="The Shapes world: sample captioned clips, write prompt corpora.", no_args_is_help=True)


def _check_split(split: str) -> None:
    from neodragon_cli.pipelines.data.shapes import SPLITS

    if split not in SPLITS:
        raise UsageError(f"unknown split '{split}'", hint=f"use one of {', '.join(SPLITS)}")


@shapes_app.command("sample")
def sample(
    out: Path = typer.Argument(..., help="Folder to write <i>.<format> and <i>.json (prompt, scene) into."),
    count: int = typer.Option(8, "--count", "-n", min=1, help="How many clips."),
    split: str = typer.Option("train", "--split", help="train | heldout | all"),
    seed: int = typer.Option(0, "--seed", help="Clip i is drawn from the generator seeded with (seed, i)."),
    prompt: str = typer.Option(None, "--prompt", help="Render scenes showing this prompt instead of random captions."),
    format: str = typer.Option("mp4", "--format", help="mp4 | gif | png (PNG-frame folders)."),
    height: int = typer.Option(128, "--height", help="Canvas height (multiple of 64)."),
    width: int = typer.Option(128, "--width", help="Canvas width (multiple of 64)."),
    frames: int = typer.Option(49, "--frames", help="Frames per clip."),
) -> None:
    """Render random clips (or clips for --prompt) with a metadata JSON beside each, as `eval` reads it."""
    import numpy as np

    from neodragon_cli.atomic import write_json
    from neodragon_cli.console import console, progress
    from neodragon_cli.pipelines.data.shapes import ShapesWorld, caption
    from neodragon_cli.pipelines.data.video_io import write_video

    _check_split(split)
    if format not in ("mp4", "gif", "png"):
        raise UsageError(f"unknown format '{format}'", hint="use mp4, gif or png")
    if out.exists() and any(out.iterdir()):
        raise ArtifactError(f"{out} exists and is not empty", hint="choose a new folder")
    check_creatable(out / "00000.json")
    world = ShapesWorld(height, width, frames)
    with progress() as bar:
        task = bar.add_task("rendering", total=count)
        for i in range(count):
            rng = np.random.default_rng((seed, i))
            if prompt:
                scene, text = world.scene_for_prompt(prompt, rng), prompt
            else:
                scene = world.sample_scene(rng, split)
                text = caption(scene, rng).text
            name = f"{i:05d}"
            write_video(out / (name if format == "png" else f"{name}.{format}"), world.render(scene), fps=world.fps, format=format)
            write_json(out / f"{name}.json", {"prompt": text, "split": scene.split, "scene": scene.to_dict(), "seed": [seed, i]})
            bar.advance(task)
    console.print(f"wrote {count} clips to {out}")


@shapes_app.command("prompts")
def prompts(
    out: Path = typer.Argument(..., help="Text file: one prompt per line ('-' for stdout)."),
    count: int = typer.Option(100_000, "--count", "-n", min=1, help="How many unique prompts."),
    split: str = typer.Option("train", "--split", help="train | heldout | all"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write a deterministic corpus of unique captions (e.g. for text-encoder distillation)."""
    from neodragon_cli.atomic import write_text
    from neodragon_cli.console import console
    from neodragon_cli.pipelines.data.shapes import prompt_corpus

    _check_split(split)
    if str(out) != "-":
        check_output_file(out)
    text = "\n".join(prompt_corpus(count, seed=seed, split=split)) + "\n"
    if str(out) == "-":
        typer.echo(text, nl=False)
    else:
        write_text(out, text)
        console.print(f"wrote {count} prompts to {out}")


def register(app: typer.Typer) -> None:
    app.add_typer(shapes_app, name="shapes")
