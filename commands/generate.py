"""`neodragon generate`: text (or first frame) to video.

    neodragon generate "a red circle moving left" -o out.mp4
    neodragon generate --prompts-file prompts.txt -o videos/ --model DIR --mode monolithic --steps 10-10-10

Settings are layered: the model's defaults (its pipeline.json, or the shipped neodragon/* and
pyramid_flow/* recipes for the published layouts) < `--recipe` (+ `--set key=value`) < options.
Every video gets a metadata JSON beside it (prompt, seed, settings, model and component content
hashes, per-component time); files appear only when complete. An existing video is replaced only
with --overwrite, and every output path is checked before a model is loaded.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from neodragon_cli import __version__
from neodragon_cli.artifacts import folder_hash, resolve_model, sha256_file
from neodragon_cli.atomic import write_json
from neodragon_cli.errors import UsageError
from neodragon_cli.paths import check_new_output, check_output_file

if TYPE_CHECKING:
    from rich.table import Table

    from neodragon_cli.pipelines.flow.pipeline import Profiler, VideoPipeline
    from neodragon_cli.pipelines.flow.settings import GenerationSettings

DEFAULT_MODEL = "shapes-teacher"
FORMATS = ("mp4", "png", "gif")
MODES = ("hybrid", "monolithic")


def _slug(prompt: str, limit: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit] or "video"


def _read_prompts(prompt: str | None, prompts_file: Path | None) -> list[str]:
    if (prompt is None) == (prompts_file is None):
        raise UsageError("give exactly one of PROMPT or --prompts-file", hint="e.g. neodragon generate \"a red ball\" -o out.mp4")
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise UsageError(f"prompts file does not exist: {prompts_file}")
        prompts = [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
        if not prompts:
            raise UsageError(f"prompts file {prompts_file} has no prompts", hint="one prompt per line")
        return prompts
    if not prompt.strip():
        raise UsageError("the prompt is empty", hint="describe the video, e.g. \"a red circle moving left\"")
    return [prompt.strip()]


def _cli_settings(mode, steps, first_steps, frames, height, width, guidance, video_guidance, history_noise, sr, fps) -> GenerationSettings:
    from neodragon_cli.pipelines.flow.scheduler import parse_steps
    from neodragon_cli.pipelines.flow.settings import GenerationSettings

    if mode is not None and mode not in MODES:
        raise UsageError(f"unknown mode '{mode}'", hint=f"use one of: {', '.join(MODES)}")

    def steps_of(text, option):
        if text is None:
            return None
        try:
            return list(parse_steps(text))
        except ValueError as exc:
            raise UsageError(f"{option}: {exc}") from None

    video = steps_of(steps, "--steps")
    first = steps_of(first_steps, "--first-steps")
    settings = GenerationSettings(
        mode=mode, first_steps=first or video, video_steps=video, guidance=guidance, video_guidance=video_guidance,
        history_noise=history_noise, frames=frames, height=height, width=width, fps=fps, sr=sr,
    )  # fmt: skip
    problems = settings.validate()
    if problems:
        raise UsageError(problems[0])
    return settings


def _outputs(out: Path, prompts: list[str], fmt: str | None, single: bool, overwrite: bool) -> tuple[list[Path], str]:
    """Video paths (one per prompt, each writable and new unless `overwrite`) and the format."""
    from neodragon_cli.pipelines.data.video_io import format_for

    if single:
        paths, fmt = [out], format_for(out, fmt)
    else:
        if out.exists() and not out.is_dir():
            raise UsageError(f"with --prompts-file, -o must be a folder; {out} is a file")
        fmt = fmt or "mp4"
        suffix = "" if fmt == "png" else f".{fmt}"
        paths = [out / f"{i:03d}-{_slug(p)}{suffix}" for i, p in enumerate(prompts)]
    for path in paths:
        check_new_output(path, overwrite)
    return paths, fmt


def _component_hashes(pipe: VideoPipeline, cache: dict) -> dict[str, str]:
    if not cache:
        for role, path in pipe.component_paths.items():
            cache[role] = sha256_file(path) if path.is_file() else folder_hash(path)
    return cache


def _profile_table(profile: Profiler, wall: float) -> Table:
    from rich.table import Table

    table = Table("component", "calls", "total s", "ms/call", "peak MB", title="per-component time and memory")
    for name, c in profile.components.items():
        table.add_row(name, str(c.calls), f"{c.seconds:.3f}", f"{1000 * c.seconds / max(c.calls, 1):.1f}", f"{c.peak_mb:.0f}")
    table.add_row("other (sampler, I/O)", "", f"{wall - profile.total_seconds():.3f}", "", "")
    table.add_row("total", "", f"{wall:.3f}", "", "")
    return table


def generate(
    prompt: str = typer.Argument(None, help="What the video shows.", show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="Output video (or a folder with --prompts-file)."),
    prompts_file: Path = typer.Option(None, "--prompts-file", help="One prompt per line; one video each."),
    model: str = typer.Option(None, "--model", help=f"Model folder or embedded name (default: the recipe's, else {DEFAULT_MODEL})."),
    mode: str = typer.Option(None, "--mode", help="hybrid (first frame given, 1-1-1) or monolithic (multi-step, CFG)."),
    steps: str = typer.Option(None, "--steps", help="Euler steps per stage, e.g. 1-1-1 or 20-20-20 (every latent frame)."),
    first_steps: str = typer.Option(None, "--first-steps", help="Steps per stage for a generated latent 0 (monolithic)."),
    frames: int = typer.Option(None, "--frames", help="Number of frames, 1 + 8k (e.g. 49)."),
    height: int = typer.Option(None, "--height", help="Height in pixels, a multiple of 64."),
    width: int = typer.Option(None, "--width", help="Width in pixels, a multiple of 64."),
    seed: int = typer.Option(None, "--seed", help="Random seed (default: the recipe's, else 0)."),
    guidance: float = typer.Option(None, "--guidance", help="CFG scale for the first latent frame (0 = off)."),
    video_guidance: float = typer.Option(None, "--video-guidance", help="CFG scale for later latent frames (0 = off)."),
    history_noise: float = typer.Option(None, "--history-noise", help="Noise level in [0, 1) mixed into the earlier latent frames the model conditions on (damps drift)."),
    image: Path = typer.Option(None, "--image", help="First frame image (hybrid mode)."),
    sr: bool = typer.Option(None, "--sr/--no-sr", help="2x super-resolution (needs an sr component)."),
    fps: float = typer.Option(None, "--fps", help="Frames per second of the video."),
    format: str = typer.Option(None, "--format", help="mp4, png (a folder of frames) or gif (default: from the -o suffix)."),
    recipe: str = typer.Option(None, "--recipe", help="A generate recipe (shipped name or YAML path)."),
    overrides: list[str] = typer.Option(None, "--set", help="Recipe override key.sub=value (repeatable)."),
    json_path: Path = typer.Option(None, "--json", help="Write a JSON summary of the run here."),
    profile: bool = typer.Option(False, "--profile", help="Print per-component time and peak memory."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output videos."),
) -> None:
    """Generate videos from text prompts (or a first frame) with a pyramidal-flow video model."""
    from neodragon_cli.pipelines.flow.pipeline import VideoPipeline, load_image
    from neodragon_cli.pipelines.flow.settings import GenerateRecipe

    # everything a user can get wrong is checked before any model is loaded
    prompts = _read_prompts(prompt, prompts_file)
    if format is not None and format not in FORMATS:
        raise UsageError(f"unknown format '{format}'", hint=f"use one of: {', '.join(FORMATS)}")
    cli = _cli_settings(mode, steps, first_steps, frames, height, width, guidance, video_guidance, history_noise, sr, fps)
    run = GenerateRecipe()
    if recipe is not None:
        from neodragon_cli import recipes

        run = recipes.load(recipe, overrides or [], command="generate")
    elif overrides:
        raise UsageError("--set needs --recipe")
    model_dir = resolve_model(model or run.model or DEFAULT_MODEL)
    first_frame = load_image(image) if image is not None else None
    seed = run.seed if seed is None else seed
    paths, fmt = _outputs(out, prompts, format or (None if recipe is None else run.format), prompt is not None, overwrite)
    if json_path is not None:
        check_output_file(json_path)

    pipe = VideoPipeline.from_pretrained(model_dir, mode=cli.mode or run.sampling.mode)
    settings = pipe.settings(run.sampling, cli)
    pipe.check(settings, have_image=first_frame is not None)
    hashes: dict[str, str] = {}
    summary = []
    for text, path in zip(prompts, paths):
        summary.append(_generate_one(pipe, text, settings, seed, first_frame, path, fmt, model_dir, hashes, profile))
    if json_path is not None:
        write_json(json_path, {"videos": summary})


def _generate_one(pipe, prompt, settings, seed, image, path: Path, fmt, model_dir, hashes, show_profile) -> dict:
    import platform

    import torch

    from neodragon_cli.console import console, progress
    from neodragon_cli.pipelines.data.video_io import VideoWriter
    from neodragon_cli.pipelines.flow.pipeline import Profiler

    config = settings.sampling_config()
    num_latents = pipe.vae.latent_frames(settings.frames)
    first_unit = 1 if settings.mode == "hybrid" else 0
    total_steps = sum(sum(config.unit_plan(u)[0]) for u in range(first_unit, num_latents))
    profiler = Profiler(pipe.device)
    start = time.perf_counter()
    with progress() as bar, VideoWriter(path, fps=settings.fps, format=fmt) as writer:
        task = bar.add_task(_slug(prompt, 30), total=total_steps)

        def on_step(event):
            bar.update(task, advance=1, description=f"frame {event.unit + 1}/{event.num_units} stage {event.stage}")

        result = pipe.generate(
            prompt, settings, seed=seed, image=image, sink=writer.append, callback=on_step, profile=profiler
        )
    wall = time.perf_counter() - start
    meta = {
        "video": str(path),
        "prompt": prompt,
        "seed": seed,
        "frames": result.num_frames,
        "fps": settings.fps,
        "format": fmt,
        "settings": settings.as_dict(),
        "latent_frames": num_latents,
        "model": {"path": str(model_dir), "name": pipe.name, "components": _component_hashes(pipe, hashes)},
        "timing": {"wall_seconds": wall, "components": profiler.as_dict()},
        "neodragon_version": __version__,
        "torch_version": torch.__version__,
        "platform": platform.platform(),
    }
    write_json(path.with_suffix(".json") if path.suffix else path.with_name(path.name + ".json"), meta)
    console.print(f"wrote {path} ({result.num_frames} frames, {wall:.1f} s)", highlight=False)
    if show_profile:
        console.print(_profile_table(profiler, wall))
    return meta


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
