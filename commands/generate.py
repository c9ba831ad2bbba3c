"""`neodragon generate`: text (or first frame) to video.

    neodragon generate "a red circle moving left" -o out.mp4
    neodragon generate --prompts-file prompts.txt -o videos/ --model DIR --mode monolithic --steps 10-10-10
    torchrun --nproc_per_node 4 $(which neodragon) generate --prompts-file prompts.txt -o videos/ --num-samples 5

A batch (--prompts-file, or --num-samples > 1) writes into the folder -o; sample i of a prompt gets
its own seed derived from --seed (`sample_seed`), and its JSON records that seed and a command that
regenerates the one video alone. `--batch-size N` makes N videos together (each row from its own seed,
so equal to the video made alone up to float rounding). Under torchrun the videos are shared out over the
ranks, each rank loading the pipeline once. An optional safety checker judges frames spread over each video; a flagged
video is not written (its JSON says why). See docs/generate.md.

Settings are layered: the model's defaults (its pipeline.json, or the shipped neodragon/* and
pyramid_flow/* recipes for the published layouts) < `--recipe` (+ `--set key=value`) < options.
Every video gets a metadata JSON beside it (prompt, seed, settings, model and component content
hashes, per-component time); files appear only when complete. An existing video is replaced only
with --overwrite (or, with --skip-existing, when its JSON is missing: a half-written output), and every
output path is checked before a model is loaded.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from neodragon_cli import __version__
from neodragon_cli.artifacts import folder_hash, resolve_model, sha256_file
from neodragon_cli.atomic import write_json
from neodragon_cli.errors import NeodragonError, UsageError
from neodragon_cli.paths import check_new_output, check_output_file
from neodragon_cli.pipelines.flow.batch import batch_video_names as _video_names
from neodragon_cli.pipelines.flow.batch import slug as _slug

if TYPE_CHECKING:
    from rich.table import Table

    from neodragon_cli.pipelines.eval.safety import SafetyChecker
    from neodragon_cli.pipelines.flow.pipeline import Profiler, VideoPipeline
    from neodragon_cli.pipelines.flow.settings import GenerationSettings

DEFAULT_MODEL = "shapes-teacher"
FORMATS = ("mp4", "png", "gif")
MODES = ("hybrid", "monolithic")
# options that choose a batch or its files rather than what a video looks like: a video's replay
# command leaves them out (and gives its own prompt, -o, --seed, --format and --dtype)
NOT_REPLAYED = {
    "prompt", "out", "prompts_file", "num_samples", "vbench_names", "skip_existing", "max_prompts", "seed",
    "format", "dtype", "json_path", "profile", "overwrite", "batch_size",
}  # fmt: skip


@dataclass
class Job:
    """One video of the run: sample `sample` of prompt number `index`."""

    index: int
    prompt: str
    sample: int
    seed: int
    path: Path


def _read_prompts(prompt: str | None, prompts_file: Path | None, max_prompts: int | None) -> list[str]:
    if (prompt is None) == (prompts_file is None):
        raise UsageError("give exactly one of PROMPT or --prompts-file", hint="e.g. neodragon generate \"a red ball\" -o out.mp4")
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise UsageError(f"prompts file does not exist: {prompts_file}")
        prompts = [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
        if not prompts:
            raise UsageError(f"prompts file {prompts_file} has no prompts", hint="one prompt per line")
        return prompts[:max_prompts]
    if not prompt.strip():
        raise UsageError("the prompt is empty", hint="describe the video, e.g. \"a red circle moving left\"")
    return [prompt.strip()]


def _cli_settings(mode, steps, first_steps, frames, height, width, guidance, video_guidance, history_noise, sr, fps,
                  prompt_modifier) -> GenerationSettings:
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
        prompt_modifier=prompt_modifier,
    )  # fmt: skip
    problems = settings.validate()
    if problems:
        raise UsageError(problems[0])
    return settings


def _check_counts(num_samples: int, max_prompts: int | None, safety_frames: int, batch_size: int) -> None:
    for option, value in (("--num-samples", num_samples), ("--max-prompts", max_prompts), ("--safety-check-frames", safety_frames),
                          ("--batch-size", batch_size)):  # fmt: skip
        if value is not None and value < 1:
            raise UsageError(f"{option} must be at least 1, got {value}")


def _jobs(out: Path, prompts: list[str], fmt: str | None, single: bool, num_samples: int, seed: int, vbench: bool) -> tuple[list[Job], str]:
    """Every video of the run and the format; a single video keeps `seed`, a batch derives one per video."""
    from neodragon_cli.pipelines.data.video_io import format_for
    from neodragon_cli.pipelines.flow.pipeline import sample_seed

    if single:
        return [Job(0, prompts[0], 0, seed, out)], format_for(out, fmt)
    if out.exists() and not out.is_dir():
        raise UsageError(f"with --prompts-file or --num-samples, -o must be a folder; {out} is a file")
    fmt = fmt or "mp4"
    names = iter(_video_names(prompts, num_samples, vbench, "" if fmt == "png" else f".{fmt}"))
    jobs = [
        Job(index, prompt, sample, sample_seed(seed, prompt, sample), out / next(names))
        for index, prompt in enumerate(prompts)
        for sample in range(num_samples)
    ]
    return jobs, fmt


def _meta_path(video: Path) -> Path:
    return video.with_suffix(".json") if video.suffix else video.with_name(video.name + ".json")


def _is_done(video: Path) -> bool:
    """A complete output: the video and its JSON, or the JSON of a video the safety checker refused."""
    try:
        status = json.loads(_meta_path(video).read_text()).get("status")
    except (OSError, ValueError):
        return False
    return status == "flagged" or video.exists()


def _check_outputs(jobs: list[Job], overwrite: bool, skip_existing: bool) -> list[Job]:
    """The jobs still to run; each one's path is checked (new, or replaceable) before any model loads."""
    todo = []
    for job in jobs:
        if skip_existing and _is_done(job.path):
            continue
        check_new_output(job.path, overwrite or skip_existing)  # with --skip-existing only half-written ones remain
        todo.append(job)
    return todo


def _safety_checker(folder: Path | None, disabled: bool) -> SafetyChecker | None:
    """The checker of --safety-checker (checked and loaded before the pipeline), or None."""
    if folder is None:
        return None
    from neodragon_cli.pipelines.eval.safety import SafetyChecker, folder_problem

    if disabled:
        raise UsageError("give --safety-checker or --no-safety-check, not both")
    problem = folder_problem(folder)
    if problem is not None:
        raise UsageError(problem, hint="give a folder like CompVis/stable-diffusion-safety-checker, or --no-safety-check")
    return SafetyChecker.from_pretrained(folder)


def _replay_options(ctx: typer.Context) -> list[str]:
    """The options given on this command line that shape a video, as arguments again."""
    args = []
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if param.name in NOT_REPLAYED or source is None or source.name == "DEFAULT":
            continue
        value = ctx.params[param.name]
        if isinstance(value, Path) or (param.name in ("model", "recipe") and Path(value).exists()):
            value = str(Path(value).absolute())
        if param.is_flag:
            args.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            args += [a for v in (value if param.multiple else [value]) for a in (param.opts[0], str(v))]
    return args


def _replay_command(job: Job, fmt: str, dtype: str, options: list[str]) -> str:
    """A command that makes this one video alone (a single video uses --seed as it is)."""
    return shlex.join(["neodragon", "generate", job.prompt, "-o", str(job.path), "--seed", str(job.seed),
                       "--format", fmt, "--dtype", dtype, *options])  # fmt: skip


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
    ctx: typer.Context,
    prompt: str = typer.Argument(None, help="What the video shows.", show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="Output video (a folder for a batch: --prompts-file or --num-samples > 1)."),
    prompts_file: Path = typer.Option(None, "--prompts-file", help="One prompt per line; one video each (per sample)."),
    model: str = typer.Option(None, "--model", help=f"Model folder or embedded name (default: the recipe's, else {DEFAULT_MODEL})."),
    mode: str = typer.Option(None, "--mode", help="hybrid (first frame given, 1-1-1) or monolithic (multi-step, CFG)."),
    steps: str = typer.Option(None, "--steps", help="Euler steps per stage, e.g. 1-1-1 or 20-20-20 (every latent frame)."),
    first_steps: str = typer.Option(None, "--first-steps", help="Steps per stage for a generated latent 0 (monolithic)."),
    frames: int = typer.Option(None, "--frames", help="Number of frames, 1 + 8k (e.g. 49)."),
    height: int = typer.Option(None, "--height", help="Height in pixels, a multiple of 64."),
    width: int = typer.Option(None, "--width", help="Width in pixels, a multiple of 64."),
    seed: int = typer.Option(None, "--seed", help="Random seed (default: the recipe's, else 0); a batch derives one per video from it."),
    num_samples: int = typer.Option(1, "--num-samples", help="Videos per prompt, each with its own seed."),
    max_prompts: int = typer.Option(None, "--max-prompts", help="Use only the first N prompts of --prompts-file."),
    vbench_names: bool = typer.Option(False, "--vbench-names", help="Name batch videos <prompt>-<i>.mp4, as VBench expects."),
    skip_existing: bool = typer.Option(False, "--skip-existing", help="Skip videos already complete (video + JSON); redo half-written ones."),
    guidance: float = typer.Option(None, "--guidance", help="CFG scale for the first latent frame (0 = off)."),
    video_guidance: float = typer.Option(None, "--video-guidance", help="CFG scale for later latent frames (0 = off)."),
    history_noise: float = typer.Option(None, "--history-noise", help="Noise level in [0, 1) mixed into the earlier latent frames the model conditions on (damps drift)."),
    prompt_modifier: str = typer.Option(None, "--prompt-modifier", help="Text appended to every prompt before encoding (not in file names)."),
    cinematic: bool = typer.Option(False, "--cinematic", help="The official cinematic prompt modifier."),
    image: Path = typer.Option(None, "--image", help="First frame image (hybrid mode)."),
    sr: bool = typer.Option(None, "--sr/--no-sr", help="2x super-resolution (needs an sr component)."),
    fps: float = typer.Option(None, "--fps", help="Frames per second of the video."),
    format: str = typer.Option(None, "--format", help="mp4, png (a folder of frames) or gif (default: from the -o suffix)."),
    dtype: str = typer.Option(None, "--dtype", help="bf16, fp16 or fp32 for every component (default: the recipe's, else bf16 on CUDA, fp32 on CPU)."),
    safety_checker: Path = typer.Option(None, "--safety-checker", help="Safety checker folder (default: the model's safety_checker, if it has one)."),
    safety_frames: int = typer.Option(1, "--safety-check-frames", help="Frames the safety checker sees, spread over the video."),
    no_safety_check: bool = typer.Option(False, "--no-safety-check", help="Do not run the safety checker."),
    recipe: str = typer.Option(None, "--recipe", help="A generate recipe (shipped name or YAML path)."),
    overrides: list[str] = typer.Option(None, "--set", help="Recipe override key.sub=value (repeatable)."),
    json_path: Path = typer.Option(None, "--json", help="Write a JSON summary of the run (every video) here."),
    profile: bool = typer.Option(False, "--profile", help="Print per-component time and peak memory."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output videos."),
    runtime: str = typer.Option("torch", "--runtime", help="torch, or onnx: every network call in ONNX Runtime (--model: a `neodragon export` folder)."),
    batch_size: int = typer.Option(1, "--batch-size", help="Videos generated together (faster per video on CPU); each equals its video made alone up to float rounding."),
) -> None:
    """Generate videos from text prompts (or a first frame) with a pyramidal-flow video model."""
    from neodragon_cli.pipelines.flow.pipeline import DTYPES, VideoPipeline, load_image, parse_dtype
    from neodragon_cli.pipelines.flow.settings import CINEMATIC_MODIFIER, GenerateRecipe
    from neodragon_cli.pipelines.train.distributed import process_group

    # everything a user can get wrong is checked before any model is loaded
    _check_counts(num_samples, max_prompts, safety_frames, batch_size)
    prompts = _read_prompts(prompt, prompts_file, max_prompts)
    if format is not None and format not in FORMATS:
        raise UsageError(f"unknown format '{format}'", hint=f"use one of: {', '.join(FORMATS)}")
    if runtime not in ("torch", "onnx"):
        raise UsageError(f"unknown runtime '{runtime}'", hint="use torch or onnx")
    if runtime == "onnx" and batch_size > 1:
        raise UsageError("--runtime onnx generates one video at a time: its graphs are exported for one", hint="use --batch-size 1")
    if cinematic and prompt_modifier is not None:
        raise UsageError("give --prompt-modifier or --cinematic, not both")
    cli = _cli_settings(mode, steps, first_steps, frames, height, width, guidance, video_guidance, history_noise, sr, fps,
                        CINEMATIC_MODIFIER if cinematic else prompt_modifier)  # fmt: skip
    run = GenerateRecipe()
    if recipe is not None:
        from neodragon_cli import recipes

        run = recipes.load(recipe, overrides or [], command="generate")
    elif overrides:
        raise UsageError("--set needs --recipe")
    dtype = dtype or run.dtype
    if dtype is not None:
        parse_dtype(dtype)
    model_dir = resolve_model(model or run.model or DEFAULT_MODEL)
    first_frame = load_image(image) if image is not None else None
    seed = run.seed if seed is None else seed
    single = prompt is not None and num_samples == 1
    jobs, fmt = _jobs(out, prompts, format or (None if recipe is None else run.format), single, num_samples, seed, vbench_names)
    todo = _check_outputs(jobs, overwrite, skip_existing)
    if json_path is not None:
        check_output_file(json_path)
    checker = _safety_checker(safety_checker, no_safety_check)

    with process_group() as env:
        dtype = dtype or ("bf16" if env.device.type == "cuda" else "fp32")
        mine = todo[env.rank :: env.world_size]
        pipe = None
        if mine and runtime == "onnx":
            from neodragon_cli.pipelines.deploy.runtime import load_onnx_pipeline

            pipe = load_onnx_pipeline(model_dir)
        elif mine:  # a rank with no video to make loads nothing
            pipe = VideoPipeline.from_pretrained(
                model_dir, mode=cli.mode or run.sampling.mode, device=env.device, dtype=DTYPES[dtype],
                safety_checker=checker is None and not no_safety_check,
            )  # fmt: skip
            checker = None if no_safety_check else checker or pipe.safety_checker
            if checker is not None:
                checker.to(env.device)
        context = _RunContext(pipe, model_dir, first_frame, fmt, dtype, checker, safety_frames, _replay_options(ctx),
                              show=env.is_main, profile=profile)  # fmt: skip
        start = time.perf_counter()
        if pipe is not None:
            settings = pipe.settings(run.sampling, cli)
            pipe.check(settings, have_image=first_frame is not None)
            for first in range(0, len(mine), batch_size):
                context.run(mine[first : first + batch_size], settings, batch=not single)
        records = _gather(context.records, env)
    wall = time.perf_counter() - start
    if not env.is_main:
        return
    by_path = {r["video"]: r for r in records}
    videos = [by_path.get(str(job.path)) or _skipped(job) for job in jobs]
    summary = _summary(videos, wall)
    if not single:
        _print_summary(summary, videos)
    if json_path is not None:
        write_json(json_path, {"summary": summary, "videos": videos})
    flagged = next((v for v in videos if v["status"] == "flagged"), None)
    if single and flagged is not None:
        raise NeodragonError(f"{flagged['video']} was not written: {flagged['safety_check']['reason']}", hint="see " + str(_meta_path(Path(flagged["video"]))))
    if summary["failed"]:
        raise NeodragonError(f"{summary['failed']} of {len(videos)} videos failed", hint="see the errors above")


def _gather(records: list[dict], env) -> list[dict]:
    """Every rank's records (one list, on every rank)."""
    if not env.distributed:
        return records
    import torch.distributed as dist

    gathered: list[list[dict]] = [[] for _ in range(env.world_size)]
    dist.all_gather_object(gathered, records)
    return [r for rank_records in gathered for r in rank_records]


def _skipped(job: Job) -> dict:
    return {"video": str(job.path), "status": "skipped", "prompt": job.prompt, "sample": job.sample, "seed": job.seed}


def _summary(videos: list[dict], wall: float) -> dict:
    counts = {status: sum(v["status"] == status for v in videos) for status in ("written", "skipped", "flagged", "failed")}
    made = [v["timing"]["wall_seconds"] for v in videos if "timing" in v]
    return {**counts, "videos": len(videos), "wall_seconds": wall, "seconds_per_video": sum(made) / len(made) if made else None}


def _print_summary(summary: dict, videos: list[dict]) -> None:
    from neodragon_cli.console import console

    for video in videos:
        if video["status"] in ("flagged", "failed"):
            why = video["safety_check"]["reason"] if video["status"] == "flagged" else video["error"]
            console.print(f"{video['status']}: {video['video']}: {why}\n  regenerate alone: {video['regenerate']}", highlight=False)
    per_video = "" if summary["seconds_per_video"] is None else f", {summary['seconds_per_video']:.1f} s per video"
    console.print(
        f"{summary['videos']} videos: {summary['written']} written, {summary['skipped']} skipped, {summary['flagged']} flagged, "
        f"{summary['failed']} failed in {summary['wall_seconds']:.1f} s{per_video}",
        highlight=False,
    )


class _RunContext:
    """What every video of this rank shares; `run(job)` makes one and keeps its record."""

    def __init__(self, pipe, model_dir, image, fmt, dtype, checker, safety_frames, replay_options, *, show, profile):
        self.pipe, self.model_dir, self.image, self.fmt, self.dtype = pipe, model_dir, image, fmt, dtype
        self.checker, self.safety_frames, self.replay_options = checker, safety_frames, replay_options
        self.show, self.profile = show, profile
        self.hashes: dict[str, str] = {}
        self.records: list[dict] = []

    def run(self, jobs: list[Job], settings: GenerationSettings, *, batch: bool) -> None:
        """Make the videos of `jobs` together; in a batch a failure is recorded and the batch goes on."""
        from neodragon_cli.console import console

        if not batch:
            self.records.extend(self._make(jobs, settings))
            return
        try:
            self.records.extend(self._make(jobs, settings))
        except Exception as exc:  # noqa: BLE001 -- one bad video must not stop a long batch; it is reported
            for job in jobs:
                console.print(f"failed: {job.path}: {exc}", highlight=False)
                self.records.append({**_skipped(job), "status": "failed", "error": str(exc) or type(exc).__name__,
                                     "regenerate": _replay_command(job, self.fmt, self.dtype, self.replay_options)})  # fmt: skip

    def _make(self, jobs: list[Job], settings: GenerationSettings) -> list[dict]:
        import platform

        import numpy as np
        import torch

        from neodragon_cli.console import console, progress
        from neodragon_cli.pipelines.data.video_io import VideoWriter
        from neodragon_cli.pipelines.eval.safety import frame_indices
        from neodragon_cli.pipelines.flow.pipeline import Profiler

        pipe = self.pipe
        config = settings.sampling_config()
        num_latents = pipe.vae.latent_frames(settings.frames)
        first_unit = 1 if settings.mode == "hybrid" else 0
        total_steps = sum(sum(config.unit_plan(u)[0]) for u in range(first_unit, num_latents))
        checked = frame_indices(settings.frames, self.safety_frames) if self.checker is not None else []
        picked: list[list[np.ndarray]] = [[] for _ in jobs]
        writers = [VideoWriter(job.path, fps=settings.fps, format=self.fmt) for job in jobs]

        def sink(row: int):
            def take(chunk: np.ndarray) -> None:
                first = writers[row].frame_count
                picked[row].extend(chunk[i - first] for i in checked if first <= i < first + len(chunk))
                writers[row].append(chunk)

            return take

        profiler = Profiler(pipe.device)
        start = time.perf_counter()
        verdicts = [None] * len(jobs)
        try:
            with progress(disable=not self.show) as bar:
                label = _slug(jobs[0].prompt, 30) + (f" +{len(jobs) - 1}" if len(jobs) > 1 else "")
                task = bar.add_task(label, total=total_steps)

                def on_step(event):
                    bar.update(task, advance=1, description=f"frame {event.unit + 1}/{event.num_units} stage {event.stage}")

                results = pipe.generate_batch(
                    [job.prompt for job in jobs], settings, seeds=[job.seed for job in jobs], image=self.image,
                    sinks=[sink(row) for row in range(len(jobs))], callback=on_step, profile=profiler,
                )  # fmt: skip
            for row, writer in enumerate(writers):
                if self.checker is not None:
                    with profiler.section("safety_checker"):
                        verdicts[row] = self.checker.check(np.stack(picked[row]), checked)
                if verdicts[row] is not None and verdicts[row].flagged:
                    writer.abort()
                else:
                    writer.close()
        except BaseException:
            for writer in writers:
                writer.abort()
            raise
        wall = time.perf_counter() - start
        metas = []
        for job, result, verdict in zip(jobs, results, verdicts):
            meta = {
                "video": str(job.path),
                "status": "flagged" if verdict is not None and verdict.flagged else "written",
                "prompt": job.prompt,
                "sample": job.sample,
                "seed": job.seed,
                "regenerate": _replay_command(job, self.fmt, self.dtype, self.replay_options),
                "frames": result.num_frames,
                "fps": settings.fps,
                "format": self.fmt,
                "dtype": self.dtype,
                "safety_check": verdict.as_dict() if verdict is not None else None,
                "settings": settings.as_dict(),
                "latent_frames": num_latents,
                "model": {"path": str(self.model_dir), "name": pipe.name, "components": _component_hashes(pipe, self.hashes)},
                # made together with the others of its batch: the batch's time, shared out per video
                "timing": {"wall_seconds": wall / len(jobs), "batch_size": len(jobs), "batch_wall_seconds": wall,
                           "components": profiler.as_dict()},  # fmt: skip
                "neodragon_version": __version__,
                "torch_version": torch.__version__,
                "platform": platform.platform(),
            }
            write_json(_meta_path(job.path), meta)
            if meta["status"] == "flagged":
                console.print(f"not written: {job.path} ({verdict.reason()})", highlight=False)
            elif self.show:
                console.print(f"wrote {job.path} ({result.num_frames} frames, {wall / len(jobs):.1f} s)", highlight=False)
            metas.append(meta)
        if self.profile:
            console.print(_profile_table(profiler, wall))
        return metas


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
