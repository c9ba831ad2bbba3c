"""`neodragon run CHAIN -o OUT`: the optimisation commands applied in order, each step's artifact the
next one's parent, every step cached by content.

A chain recipe (`command: chain`) names the first parent and the steps, in order, by name:

    command: chain
    model: shapes-teacher                  # the first step's parent (a folder or an embedded name)
    steps:
      distill-te: {command: distill-te, recipe: shapes/distill_te, overrides: {mode: rm}}
      prune:      {command: prune, recipe: shapes/prune, overrides: {train.max_steps: 100}}
      export:     {command: export, options: {components: all}}
      eval:       {command: eval, options: {shapes_prompts: 8}}

A step whose command takes a recipe (the training commands) gets that recipe, its `overrides` and the
command line's `steps.NAME.KEY=VALUE`, with `parent` set by the chain; a command without a recipe
(export, eval) gets typed `options` (`steps.NAME.KEY=VALUE` sets those). Each step runs in process (no
subprocess: the library entry points are the same code the commands call, errors keep their type and
exit code, and torch is imported once) into `OUT/NN-NAME/`:

    OUT/run.json                     every step: state (cached, ran, pending, failed, stopped), wall time,
                                     artifact, results (for CI and reports)
    OUT/01-distill-te/step.json      the step's cache key, what it was made of, its state and time
    OUT/01-distill-te/artifact/      the artifact (`neodragon verify` passes; the next step's parent)
    OUT/01-distill-te/artifact.work/ a training command's checkpoints and caches (a resume continues them)
    OUT/04-eval/eval.json, videos/   a step that writes a report, not a model
    OUT/report.md, report.json       the paper's tables for the run (`chain_report`), after every run

An eval step makes the videos `neodragon generate --prompts-file --num-samples --seed` makes from the
artifact before it and scores them as `neodragon eval` does; a chain may hold several (e.g. one after
each stage, the later ones with `reference: eval-teacher` for PSNR / SSIM to the teacher's videos).

The cache key of a step is a sha256 of its command and step version, the neodragon version, its
resolved configuration (the recipe with the parent left out, or the options; an eval step's prompt
list itself and what its reference is made of) and its parent's content hash (the `output` digest its artifact's state.json records, as
`neodragon verify` checks it). A step whose `step.json` holds the same key and whose artifact still
verifies is not run again. A step whose key matches but that did not finish (stopped, interrupted,
failed) continues: a training step with its own resume from `artifact.work/`. A changed key starts the
step afresh (its old work folder removed). `--from STEP` reruns STEP and every later step afresh.

Every step's command and recipe (or options) are validated, and the order of operations checked
against `neodragon_cli.artifacts.OPERATIONS`, before anything runs or is written; a problem is a
`RecipeError` (exit 2) listing every one found. `STEP_KINDS` lists the commands a chain can run: a
training command is one `TrainingStep(...)` line; other commands add a `StepKind` with an options
schema and a function calling their library entry point.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from neodragon_cli import recipes as R
from neodragon_cli.errors import ArtifactError, NeodragonError, RecipeError, UsageError
from neodragon_cli.pipelines.flow.settings import GenerationSettings
from neodragon_cli.recipes import recipe_schema, setting
from neodragon_cli.registry import did_you_mean

RUN_FILE = "run.json"
STEP_FILE = "step.json"
ARTIFACT_DIR = "artifact"
RUN_FORMAT = "neodragon-chain-run/1"
STEP_FORMAT = "neodragon-chain-step/1"
PARENT_PLACEHOLDER = "<the previous step's artifact>"
EVAL_FILE = "eval.json"
EVAL_VIDEOS = "videos"
EVAL_FORMAT = "neodragon-chain-eval/2"


# ----------------------------------------------------------------------------- recipe schema


@dataclass
class StepSpec:
    """One step of a chain."""

    command: str = setting("", "the command the step runs (see `neodragon run --help` for the available ones)")
    recipe: str = setting("", "the step's recipe, for commands that take one: a shipped name or a path relative to the chain file")
    overrides: dict[str, Any] = setting({}, "key.sub: value overrides of the step's recipe (a nested mapping works too)")
    options: dict[str, Any] = setting({}, "settings of a command without a recipe (export, eval)")


@recipe_schema("chain")
@dataclass
class ChainRecipe:
    """A chain of optimisation commands, each step's artifact the next one's parent."""

    model: str = setting("shapes-teacher", "the first step's parent: a pipeline folder or an embedded model's name")
    steps: dict[str, StepSpec] = setting({}, "the steps in the order they run, by name (letters, digits, - and _)")

    def validate(self) -> list[str]:
        problems = []
        if not self.steps:
            problems.append("a chain needs at least one step")
        for name, step in self.steps.items():
            if not name or not all(c.isalnum() or c in "-_" for c in name):
                problems.append(f"step name '{name}' may hold only letters, digits, - and _")
            if not step.command:
                problems.append(f"steps.{name}: missing 'command'")
        return problems


# ----------------------------------------------------------------------------- step kinds


@dataclass
class ExportOptions:
    """`neodragon export` settings (null: export's default)."""

    components: str = setting("all", "all, or a comma list of text, context_adapter, mmdit, vae_encoder, decoder, sr")
    height: int | None = setting(None, "video height (null: the model's); give height, width and frames together")
    width: int | None = setting(None, "video width (null: the model's)")
    frames: int | None = setting(None, "video frames, 1 + 8k (null: the model's)")
    opset: int | None = setting(None, "ONNX opset (null: export's default)")
    mask_fill: float | None = setting(None, "finite additive attention-mask value (null: export's default)")
    min_sqnr: float | None = setting(None, "every graph output's SQNR vs PyTorch in dB at least this (null: export's default)")

    def validate(self) -> list[str]:
        given = [v for v in (self.height, self.width, self.frames) if v is not None]
        return ["give all of height, width and frames, or none"] if given and len(given) != 3 else []


@dataclass
class EvalOptions:
    """Make the videos `neodragon generate --prompts-file P --num-samples N --seed S` makes from the parent
    (the same names and per-video seeds) and score them as `neodragon eval` does (`--reference` too)."""

    prompts: str = setting("", "prompts file, one per line (relative to the chain file); empty: Shapes captions")
    shapes_prompts: int = setting(8, "number of Shapes captions when `prompts` is empty")
    split: Literal["train", "heldout"] = setting("heldout", "caption split of the Shapes prompts (heldout: attribute combinations never trained on)")
    prompt_seed: int = setting(1, "seed of the Shapes prompt list (as `neodragon shapes prompts --seed`)")
    seed: int = setting(0, "as `generate --seed`: video k of a prompt is made from sample_seed(seed, prompt, k)")
    num_samples: int = setting(1, "videos per prompt, as `generate --num-samples`")
    reference: str = setting("", "PSNR / SSIM against the video of the same prompt and seed in: an earlier eval step of the chain (its name), or a folder of `generate` videos (relative to the chain file); empty: none")
    runtime: Literal["auto", "torch", "onnx"] = setting("auto", "auto: ONNX Runtime for an exported parent, else PyTorch")
    sampling: GenerationSettings = field(default_factory=GenerationSettings, metadata={"doc": "generation settings over the model's defaults"})

    def validate(self) -> list[str]:
        problems = []
        if not self.prompts and self.shapes_prompts < 1:
            problems.append("give a prompts file or shapes_prompts >= 1")
        if self.num_samples < 1:
            problems.append(f"num_samples must be at least 1, got {self.num_samples}")
        return problems


@dataclass
class QuantizeOptions:
    """`neodragon quantize` settings (null: quantize's default, e.g. W8A16 with AdaRound on the SR graph)."""

    scheme: str | None = setting(None, "w8a16, w8a8 or fp16 for every graph but the text encoders and ContextAdapter (fp16)")
    per_module: list[str] = setting([], "SCHEME=MODULES items applied in order (graph names, groups or patterns)")
    adaround: str | None = setting(None, "MODULES to AdaRound, or none (null: the SR graph when the export has one)")
    adaround_iterations: int | None = setting(None, "AdaRound optimisation steps per layer")
    calibration: int | None = setting(None, "calibration inputs per graph (null: the paper's sizes)")
    backend: str | None = setting(None, "aimet or ort")
    prompts: str = setting("", "calibration prompt file (its last prompt held out); empty: Shapes captions")
    videos: int | None = setting(None, "at most this many calibration videos")
    seed: int | None = setting(None, "seed of the calibration videos")
    heldout_samples: int | None = setting(None, "held-out inputs per graph for the SQNR table")
    qnn: bool | None = setting(None, "load every graph on the QNN HTP backend with CPU fallback disabled")
    qnn_samples: int | None = setting(None, "held-out inputs run on HTP per graph")
    end_to_end: bool | None = setting(None, "compare the quantized pipeline's held-out video with the float one")
    threads: int | None = setting(None, "ONNX Runtime threads per session")

    def validate(self) -> list[str]:
        from neodragon_cli.pipelines.deploy.quantize import BACKENDS, SCHEMES

        problems = []
        if self.scheme is not None and self.scheme not in SCHEMES:
            problems.append(f"unknown scheme '{self.scheme}' (use one of {', '.join(SCHEMES)})")
        if self.backend is not None and self.backend not in BACKENDS:
            problems.append(f"unknown backend '{self.backend}' (use one of {', '.join(BACKENDS)})")
        return problems


@dataclass
class ProfileOptions:
    """`neodragon profile` settings: per-module latency and memory of the parent (Table 7), report only."""

    runtime: Literal["auto", "torch", "onnx", "qnn"] = setting("auto", "auto: torch for a model folder, onnx for an export or quantize artifact")
    runs: int = setting(5, "timed calls per module, after one warm-up call")
    dtype: Literal["bf16", "fp16", "fp32"] = setting("fp32", "torch runtime: weights and activations dtype")
    seed: int = setting(0, "seed of the end-to-end generation")
    png: bool = setting(True, "also write profile.png (latency / memory per module)")
    sampling: GenerationSettings = field(default_factory=GenerationSettings, metadata={"doc": "mode, steps, frames, height, width over the model's defaults"})

    def validate(self) -> list[str]:
        return [f"runs must be at least 1, got {self.runs}"] if self.runs < 1 else []


@dataclass
class StepContext:
    """What a step's run function gets: its parent, its validated configuration (a recipe object or
    options), its step folder, whether to continue an interrupted run, the chain file's folder and
    the folder of every step of the chain by name (in OUT)."""

    parent: Path
    config: Any
    folder: Path
    resume: bool
    chain_dir: Path
    steps: dict[str, Path] = field(default_factory=dict)

    @property
    def artifact(self) -> Path:
        return self.folder / ARTIFACT_DIR


@dataclass
class StepOutcome:
    """How a step ended: its artifact (None for a report step), whether a stop request ended it before
    the artifact was written (resume by running the chain again), and its results for run.json."""

    artifact: Path | None
    stopped: bool = False
    results: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StepKind:
    """A command a chain can run. `operation`: the artifact operation it records (None: it writes a
    report, and the next step's parent stays the previous artifact). `recipe`: it takes a recipe of
    its command (else `options` is its options schema). `version`: bump it when the step's meaning
    changes, so cached steps run again."""

    command: str
    run: Callable[[StepContext], StepOutcome]
    operation: str | None
    recipe: bool = False
    options: type | None = None
    version: int = 1
    describe: Callable[[Any, Path], Any] | None = None  # extra content of the cache key (e.g. a prompt list)


def _run_training(ctx: StepContext) -> StepOutcome:
    from neodragon_cli.pipelines.train import training_commands

    recipe = dataclasses.replace(ctx.config, parent=str(ctx.parent.resolve()))
    name = R.command_of(recipe)
    outcome = training_commands()[name].run(recipe, ctx.artifact, recipe_yaml=R.dump(recipe), resume=ctx.resume, overwrite=True)
    if outcome.stopped:
        return StepOutcome(None, stopped=True, results={"stopped_at_step": outcome.step})
    return StepOutcome(ctx.artifact, results={"steps": outcome.step})


def TrainingStep(command: str, version: int = 1) -> StepKind:
    """A training command (`pipelines/train`, `pipelines/distill`) whose recipe has a `parent`."""
    return StepKind(command, _run_training, operation=command, recipe=True, version=version)


def _run_export(ctx: StepContext) -> StepOutcome:
    from neodragon_cli.console import console
    from neodragon_cli.pipelines.deploy.export import Geometry, export_pipeline

    opts: ExportOptions = ctx.config
    geometry = Geometry(opts.height, opts.width, opts.frames) if opts.height is not None else None
    given = {k: v for k, v in (("opset", opts.opset), ("fill", opts.mask_fill), ("min_sqnr_db", opts.min_sqnr)) if v is not None}
    manifest = export_pipeline(ctx.parent, ctx.artifact, components=opts.components, geometry=geometry, overwrite=True,
                               progress=lambda name: console.print(f"exporting {name}", highlight=False), **given)  # fmt: skip
    worst = min(o["sqnr_db"] for e in manifest["graphs"].values() for o in e["validation"]["outputs"].values())
    return StepOutcome(ctx.artifact, results={"graphs": len(manifest["graphs"]), "worst_sqnr_db": worst})


def _eval_prompts(opts: EvalOptions, chain_dir: Path) -> list[str]:
    if opts.prompts:
        from neodragon_cli.pipelines.distill.prompts import read_prompts

        path = Path(opts.prompts)
        return read_prompts(path if path.is_absolute() or path.is_file() else chain_dir / path)
    from neodragon_cli.pipelines.data.shapes import prompt_corpus

    return prompt_corpus(opts.shapes_prompts, opts.prompt_seed, opts.split)


@dataclass(frozen=True)
class EvalVideo:
    """One video of an eval step: sample `sample` of `prompt`, made from `seed`, written as `name`
    (the name and seed `neodragon generate --prompts-file --num-samples --seed` give it)."""

    prompt: str
    sample: int
    seed: int
    name: str


def eval_videos(opts: EvalOptions, chain_dir: Path) -> list[EvalVideo]:
    """The step's videos, prompt-major, as `generate`'s batch makes them."""
    from neodragon_cli.pipelines.flow.batch import batch_video_names
    from neodragon_cli.pipelines.flow.pipeline import sample_seed

    prompts = _eval_prompts(opts, chain_dir)
    names = iter(batch_video_names(prompts, opts.num_samples, False, ".mp4"))
    return [EvalVideo(prompt, k, sample_seed(opts.seed, prompt, k), next(names)) for prompt in prompts for k in range(opts.num_samples)]


def reference_videos(folder: Path) -> dict[tuple[str, int], Path]:
    """(prompt, seed) -> video in a folder of `generate` (or eval-step) videos, read from the JSON beside
    each video; videos the safety checker refused (no file) are left out."""
    from neodragon_cli.pipelines.data.video_io import is_video_path

    found: dict[tuple[str, int], Path] = {}
    for meta_path in sorted(folder.glob("*.json")):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(meta, dict) or not isinstance(meta.get("prompt"), str) or not isinstance(meta.get("seed"), int):
            continue
        candidates = [folder / Path(str(meta["video"])).name] if meta.get("video") else []
        candidates += [meta_path.with_suffix(suffix) for suffix in (".mp4", ".gif", ".webm", ".mkv", ".mov", "")]
        video = next((c for c in candidates if c != meta_path and is_video_path(c)), None)
        if video is not None:
            found.setdefault((meta["prompt"], meta["seed"]), video)
    return found


def _reference_dir(opts: EvalOptions, ctx_steps: dict[str, Path], chain_dir: Path) -> Path | None:
    if not opts.reference:
        return None
    if opts.reference in ctx_steps:
        return ctx_steps[opts.reference] / EVAL_VIDEOS
    path = Path(opts.reference)
    return path if path.is_absolute() or path.is_dir() else chain_dir / path


def _missing_references(videos: list[EvalVideo], found: dict[tuple[str, int], Path], where: Path) -> str | None:
    missing = [v for v in videos if (v.prompt, v.seed) not in found]
    if not missing:
        return None
    first = missing[0]
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    return f"no reference video for '{first.prompt}' seed {first.seed}{more} in {where}"


def _run_eval(ctx: StepContext) -> StepOutcome:
    """Make the step's videos (`eval_videos`) into `videos/`, each with a JSON beside it (prompt, sample,
    seed, seconds, MMDiT calls), so `neodragon eval videos/` scores them again and another eval step or
    `neodragon eval --reference` can compare with them; score each written video as `neodragon eval`
    does (`pipelines.eval.scoring`) and write `eval.json`."""
    from neodragon_cli.artifacts import applied_operations
    from neodragon_cli.atomic import write_json
    from neodragon_cli.console import progress
    from neodragon_cli.pipelines.data.video_io import read_video, write_video
    from neodragon_cli.pipelines.distill.step_distill import nfe_per_video
    from neodragon_cli.pipelines.eval.scoring import finite, score_frames, summarize
    from neodragon_cli.pipelines.flow.pipeline import Profiler, VideoPipeline

    opts: EvalOptions = ctx.config
    jobs = eval_videos(opts, ctx.chain_dir)
    reference_dir = _reference_dir(opts, ctx.steps, ctx.chain_dir)
    references: dict[tuple[str, int], Path] = {}
    if reference_dir is not None:
        references = reference_videos(reference_dir) if reference_dir.is_dir() else {}
        problem = _missing_references(jobs, references, reference_dir)
        if problem:
            raise UsageError(problem, hint="the reference must hold the videos of the same prompts, seed and samples")
    metrics = {"judge"} | ({"psnr", "ssim"} if reference_dir is not None else set())
    runtime = opts.runtime
    if runtime == "auto":
        runtime = "onnx" if "export" in applied_operations(ctx.parent) else "torch"
    if runtime == "onnx":
        from neodragon_cli.pipelines.deploy.runtime import load_onnx_pipeline

        pipe = load_onnx_pipeline(ctx.parent)
    else:
        pipe = VideoPipeline.from_pretrained(ctx.parent, mode=opts.sampling.mode, safety_checker=False)
    settings = pipe.settings(opts.sampling)
    pipe.check(settings)
    units = pipe.vae.latent_frames(settings.frames)
    nfe = nfe_per_video(settings.first_steps, settings.video_steps, settings.guidance, settings.video_guidance, units,
                        hybrid=settings.mode == "hybrid")  # fmt: skip
    videos = ctx.folder / EVAL_VIDEOS
    shutil.rmtree(videos, ignore_errors=True)
    videos.mkdir(parents=True)
    rows = []
    with progress() as bar:
        task = bar.add_task("eval", total=len(jobs))
        for job in jobs:
            profile = Profiler(pipe.device)
            start = time.perf_counter()
            result = pipe.generate(job.prompt, settings, seed=job.seed, profile=profile)
            seconds = time.perf_counter() - start
            calls = profile.components["mmdit"].calls if "mmdit" in profile.components else 0
            path = write_video(videos / job.name, result.frames, fps=settings.fps)
            record = {"video": job.name, "prompt": job.prompt, "sample": job.sample, "seed": job.seed, "seconds": seconds,
                      "mmdit_calls": calls, "nfe": nfe}  # fmt: skip
            write_json(path.with_suffix(".json"), {**record, "runtime": runtime, "settings": settings.as_dict()})
            frames, _ = read_video(path)  # scored as written, as `neodragon eval videos/` reads it
            reference = references.get((job.prompt, job.seed))
            ref_frames = read_video(reference)[0] if reference is not None else None
            if reference is not None:
                record["reference"] = str(reference.relative_to(reference_dir))
            rows.append({**record, **score_frames(frames, job.prompt, metrics, ref_frames)})
            bar.advance(task)
    summary = summarize(rows, metrics)
    summary.update(videos=len(rows), runtime=runtime, seconds_per_video=sum(r["seconds"] for r in rows) / len(rows),
                   mmdit_calls_per_video=sum(r["mmdit_calls"] for r in rows) / len(rows), nfe_per_video=nfe)  # fmt: skip
    report = {
        "format": EVAL_FORMAT,
        "summary": summary,
        "metrics": sorted(metrics),
        "prompts": opts.prompts or {"shapes_prompts": opts.shapes_prompts, "split": opts.split, "prompt_seed": opts.prompt_seed},
        "seed": opts.seed,
        "num_samples": opts.num_samples,
        "reference": opts.reference or None,
        "settings": dataclasses.asdict(settings),
        "videos": rows,
    }
    write_json(ctx.folder / EVAL_FILE, finite(report))
    return StepOutcome(None, results=finite(summary))


def _given(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _run_quantize(ctx: StepContext) -> StepOutcome:
    from neodragon_cli.console import console
    from neodragon_cli.pipelines.deploy.quantize import (
        CalibrationSource,
        QuantizeSettings,
        plan_quantization,
        quantize_export,
        read_export,
    )

    o: QuantizeOptions = ctx.config
    manifest = read_export(ctx.parent)
    plan = plan_quantization(list(manifest["graphs"]), **_given(
        scheme=o.scheme, per_module=o.per_module or None, adaround=o.adaround, calibration=o.calibration,
        backend=o.backend, adaround_iterations=o.adaround_iterations))  # fmt: skip
    prompts = None
    if o.prompts:
        prompts = Path(o.prompts) if Path(o.prompts).is_absolute() or Path(o.prompts).is_file() else ctx.chain_dir / o.prompts
    source = CalibrationSource(**_given(prompts=prompts, seed=o.seed, max_videos=o.videos))
    settings = QuantizeSettings(**_given(threads=o.threads, heldout_samples=o.heldout_samples, qnn=o.qnn,
                                         qnn_samples=o.qnn_samples, end_to_end=o.end_to_end))  # fmt: skip
    for note in plan.notes:
        console.print(f"note: {note}", highlight=False)
    report = quantize_export(ctx.parent, ctx.artifact, plan, source, settings, overwrite=True,
                             progress=lambda text: console.print(text, highlight=False))  # fmt: skip
    graphs = {name: {"scheme": e["scheme"], "adaround": bool(e.get("adaround")), "sqnr_db": e["sqnr_db"]}
              for name, e in report["graphs"].items()}  # fmt: skip
    e2e = report["end_to_end"]
    return StepOutcome(ctx.artifact, results={"graphs": graphs, "end_to_end": e2e if isinstance(e2e, dict) else None})


def _run_profile(ctx: StepContext) -> StepOutcome:
    """`profile_pipeline` on the parent into `profile.json` (validated against the report schema) and
    `profile.png`; the results are the end-to-end time and each module's median latency per call."""
    from neodragon_cli.atomic import write_json
    from neodragon_cli.console import console
    from neodragon_cli.pipelines.deploy import profile as prof

    opts: ProfileOptions = ctx.config
    kind = prof.detect_kind(ctx.parent)
    runtime = opts.runtime if opts.runtime != "auto" else ("torch" if kind == "model" else "onnx")
    prof.check_runtime(kind, runtime)
    if runtime == "qnn":
        prof.check_qnn_available()
    report = prof.profile_pipeline(prof.Target(ctx.parent, kind, ctx.parent.name), runtime=runtime, settings=opts.sampling,
                                   runs=opts.runs, seed=opts.seed, dtype=opts.dtype,
                                   progress=lambda message: console.print(f"[dim]{message}[/]", highlight=False))  # fmt: skip
    problems = prof.validate(report)
    if problems:
        raise RuntimeError(f"the profile report does not match its schema: {problems[0]}")
    write_json(ctx.folder / "profile.json", report)
    if opts.png:
        prof.plot(report, ctx.folder / "profile.png")
    medians = {name: entry["latency_ms"]["median"] for name, entry in report["modules"].items()}
    return StepOutcome(None, results={"runtime": runtime, "end_to_end_s": report["end_to_end"]["seconds"], "median_ms": medians})


def _describe_eval(opts: EvalOptions, chain_dir: Path) -> list[str]:
    return _eval_prompts(opts, chain_dir)


def _link_eval_references(planned: list[PlannedStep], source: Path, problems: list[str]) -> None:
    """An eval step's `reference` names an earlier eval step (whose videos must include this step's:
    the same seed, prompts and samples), or a folder holding the videos of the same prompts and seeds.
    What the reference is made of enters the step's cache key: the named step's configuration, or the
    hash of each folder video used."""
    from neodragon_cli.artifacts import folder_hash, sha256_file

    by_name = {s.name: s for s in planned}
    for step in planned:
        if step.kind.command != "eval" or not step.config.reference:
            continue
        where = f"{source.name}: steps.{step.name}.options.reference"
        name = step.config.reference
        wanted = eval_videos(step.config, source.parent)
        if name in by_name:
            other = by_name[name]
            if other.kind.command != "eval" or other.index >= step.index:
                problems.append(f"{where}: step '{name}' is not an eval step before {step.name}")
                continue
            theirs = {(v.prompt, v.seed) for v in eval_videos(other.config, source.parent)}
            if any((v.prompt, v.seed) not in theirs for v in wanted):
                problems.append(f"{where}: eval step '{name}' does not make every video of {step.name} "
                                "(give both the same prompts and seed, and it at least as many num_samples)")  # fmt: skip
                continue
            content: Any = {"step": name, "config": other.config_text}
        else:
            folder = _reference_dir(step.config, {}, source.parent)
            if not folder.is_dir():
                problems.append(f"{where}: '{name}' is neither an eval step of the chain nor a folder")
                continue
            found = reference_videos(folder)
            missing = _missing_references(wanted, found, folder)
            if missing:
                problems.append(f"{where}: {missing}")
                continue
            content = [[v.prompt, v.seed, sha256_file(p) if p.is_file() else folder_hash(p)]
                       for v in wanted for p in [found[(v.prompt, v.seed)]]]  # fmt: skip
        described = json.loads(step.config_text)
        described["reference"] = content
        step.config_text = json.dumps(described, sort_keys=True)


# The commands a chain can run, by command name. A training command with a `parent` in its recipe is
# one `TrainingStep(...)` line.
STEP_KINDS: dict[str, StepKind] = {
    kind.command: kind
    for kind in (
        TrainingStep("distill-te"),
        TrainingStep("distill-decoder"),
        TrainingStep("prune"),
        TrainingStep("step-distill"),
        StepKind("export", _run_export, operation="export", options=ExportOptions),
        StepKind("quantize", _run_quantize, operation="quantize", options=QuantizeOptions),
        StepKind("profile", _run_profile, operation=None, options=ProfileOptions),
        StepKind("eval", _run_eval, operation=None, options=EvalOptions, version=2, describe=_describe_eval),
    )
}


# ----------------------------------------------------------------------------- plan and validation


@dataclass
class PlannedStep:
    index: int
    name: str
    kind: StepKind
    config: Any  # the recipe object (parent left to the chain) or the options
    config_text: str  # what of the configuration enters the cache key
    recipe: str  # the recipe name/path as written, or "" for options

    @property
    def folder_name(self) -> str:
        return f"{self.index + 1:02d}-{self.name}"


@dataclass
class ChainPlan:
    source: Path
    chain: ChainRecipe
    model: Path
    steps: list[PlannedStep]
    chain_sha256: str

    def index_of(self, name: str, flag: str) -> int:
        names = [s.name for s in self.steps]
        if name not in names:
            raise UsageError(f"{flag} {name}: the chain has no such step", hint=f"{did_you_mean(name, names)}steps: {', '.join(names)}")
        return names.index(name)


def split_overrides(overrides: list[str] | tuple[str, ...]) -> tuple[list[str], dict[str, list[tuple[str, Any]]]]:
    """Command-line overrides: `steps.NAME.KEY=VALUE` go to step NAME (parsed), the others to the chain."""
    chain, per_step = [], {}
    for text in overrides:
        key, value = R.parse_override(text)
        parts = key.split(".")
        if parts[0] == "steps":
            if len(parts) < 3:
                raise RecipeError([f"override '{text}': give steps.STEP.KEY=VALUE (a key of the step's recipe or options)"])
            per_step.setdefault(parts[1], []).append((".".join(parts[2:]), value))
        else:
            chain.append(text)
    return chain, per_step


def _flatten(mapping: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in mapping.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        items += _flatten(value, dotted) if isinstance(value, dict) and value else [(dotted, value)]
    return items


def _override_text(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is YAML: the recipe reads the value back with its type


def _plan_step(index: int, name: str, spec: StepSpec, extra: list[tuple[str, Any]], source: Path,
               problems: list[str], unavailable: list[str]) -> PlannedStep | None:  # fmt: skip
    kind = STEP_KINDS.get(spec.command)
    where = f"{source.name}: steps.{name}"
    if kind is None:
        unavailable.append(name if name == spec.command else f"{name} ({spec.command})")
        return None
    overrides = _flatten(spec.overrides) + extra
    if kind.recipe:
        if spec.options:
            problems.append(f"{where}: {spec.command} takes a recipe, not options (move them to overrides)")
        if not spec.recipe:
            problems.append(f"{where}: {spec.command} needs a recipe (a shipped name such as shapes/{spec.command.replace('-', '_')}, or a path)")
            return None
        if any(key == "parent" for key, _ in overrides):
            problems.append(f"{where}: the chain sets each step's parent; remove the 'parent' override")
            return None
        texts = [_override_text(k, v) for k, v in overrides] + [f"parent={json.dumps(PARENT_PLACEHOLDER)}"]
        try:
            path = R.resolve_path(spec.recipe, relative_to=source.parent)
            config = R.load(path, texts, command=spec.command)
        except NeodragonError as exc:
            found = exc.problems if isinstance(exc, RecipeError) else [exc.one_line()]
            found = [p for p in found if "recipe is for command" in p] or found  # not its keys then
            problems.extend(f"{where}: {p}" for p in found)
            return None
        if not any(f.name == "parent" for f in dataclasses.fields(config)):
            problems.append(f"{where}: {spec.command} recipes have no parent, so it cannot be a chain step")
            return None
        return PlannedStep(index, name, kind, config, R.dump(config, command=spec.command), spec.recipe)
    if spec.recipe:
        problems.append(f"{where}: {spec.command} takes no recipe (give its settings as options)")
    data = dict(spec.options)
    try:
        for key, value in overrides:
            R.apply_override(data, key, value)
        config = R.build(kind.options, data, source=source.name, prefix=f"steps.{name}.options")
    except RecipeError as exc:
        problems.extend(exc.problems)
        return None
    described = {"options": dataclasses.asdict(config)}
    if kind.describe is not None:
        try:
            described["content"] = kind.describe(config, source.parent)
        except NeodragonError as exc:
            problems.append(f"{where}: {exc.one_line()}")
            return None
    return PlannedStep(index, name, kind, config, json.dumps(described, sort_keys=True), "")


def load_plan(chain: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ChainPlan:
    """Read and validate a chain recipe and every step's recipe or options; check the order of the
    operations from the model's own chain on. Raises RecipeError listing every problem, or a
    UsageError for a missing model; nothing is written."""
    from neodragon_cli.artifacts import applied_operations, check_operation, resolve_model

    chain_overrides, per_step = split_overrides(overrides)
    source = R.resolve_path(chain)
    recipe = R.load(source, chain_overrides, command="chain")
    problems: list[str] = []
    for name in per_step:
        if name not in recipe.steps:
            problems.append(f"override steps.{name}.*: the chain has no step '{name}' ({did_you_mean(name, list(recipe.steps))}steps: {', '.join(recipe.steps)})")
    unavailable: list[str] = []
    planned = [
        _plan_step(i, name, spec, per_step.get(name, []), source, problems, unavailable)
        for i, (name, spec) in enumerate(recipe.steps.items())
    ]
    if all(step is not None for step in planned):
        _link_eval_references(planned, source, problems)
    if unavailable:
        problems.insert(0, f"{source.name}: this version of neodragon cannot run step{'s' * (len(unavailable) > 1)} "
                           f"{', '.join(unavailable)}: chain steps can be {', '.join(STEP_KINDS)}")  # fmt: skip
    if problems:
        raise RecipeError(problems, hint=None if unavailable and len(problems) == 1 else "fix the chain recipe or the override")
    if not recipe.model:
        raise UsageError("the chain's model is not set", hint="pass model=PATH (a pipeline folder) after the chain recipe")
    model = resolve_model(recipe.model)
    history = applied_operations(model)
    for step in planned:
        if step.kind.operation is None:
            continue
        try:
            check_operation(step.kind.operation, history)
        except UsageError as exc:
            raise UsageError(f"step {step.name}: {exc.message}", hint=exc.hint) from None
        history = history + [step.kind.operation]
    digest = hashlib.sha256(json.dumps([recipe.model] + [[s.name, s.kind.command, s.config_text] for s in planned]).encode())
    return ChainPlan(source, recipe, model, planned, digest.hexdigest())


# ----------------------------------------------------------------------------- cache


def content_id(folder: Path) -> str:
    """A folder's content hash as the chain keys it: the verified `output` of its last operation, or
    the hash of its files for a folder with no state.json (a published checkpoint)."""
    from neodragon_cli.artifacts import STATE_FILE, folder_hash, read_state, verify_artifact

    if not (folder / STATE_FILE).is_file():
        return folder_hash(folder)
    problems = verify_artifact(folder)
    if problems:
        raise ArtifactError(f"{folder} does not verify: {problems[0]}", hint=f"rebuild it (`neodragon verify {folder}`)")
    return read_state(folder)["operations"][-1]["output"]


def step_key(step: PlannedStep, parent_id: str) -> tuple[str, dict]:
    from neodragon_cli import __version__

    parts = {
        "command": step.kind.command,
        "step_version": step.kind.version,
        "neodragon_version": __version__,
        "config_sha256": hashlib.sha256(step.config_text.encode()).hexdigest(),
        "parent": parent_id,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest(), parts


def read_step(folder: Path) -> dict | None:
    try:
        record = json.loads((folder / STEP_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("format") == STEP_FORMAT else None


def cached(step: PlannedStep, folder: Path, key: str) -> dict | None:
    """The step's record when it finished with this key and what it wrote is intact, else None."""
    from neodragon_cli.artifacts import read_state, verify_artifact

    record = read_step(folder)
    if record is None or record.get("key") != key or record.get("state") not in ("ran", "cached"):
        return None
    if step.kind.operation is None:  # a report step: its record is what the chain needs
        return record
    artifact = folder / ARTIFACT_DIR
    if not artifact.is_dir() or verify_artifact(artifact):
        return None
    return record if read_state(artifact)["operations"][-1]["output"] == record.get("output") else None


# ----------------------------------------------------------------------------- running


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


@dataclass
class StepStatus:
    name: str
    command: str
    recipe: str
    state: str = "pending"  # pending, cached, ran, running, failed, stopped
    wall_s: float | None = None
    artifact: str | None = None
    key: str | None = None
    results: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ChainRun:
    plan: ChainPlan
    out: Path
    steps: list[StepStatus]
    status: str = "running"  # running, complete, stopped, failed
    started: str = field(default_factory=_now)
    wall_s: float = 0.0

    def as_dict(self) -> dict:
        return {
            "format": RUN_FORMAT,
            "chain": str(self.plan.source),
            "chain_sha256": self.plan.chain_sha256,
            "model": str(self.plan.model.resolve()),
            "status": self.status,
            "started": self.started,
            "wall_s": round(self.wall_s, 3),
            "steps": [s.as_dict() for s in self.steps],
        }

    def table(self):
        from rich.table import Table

        styles = {"cached": "cyan", "ran": "green", "failed": "bold red", "stopped": "yellow", "running": "bold"}
        table = Table("#", "step", "command", "state", "wall s", "artifact", title=f"chain {self.plan.source.name} -> {self.out}")
        for i, s in enumerate(self.steps):
            wall = "-" if s.wall_s is None else f"{s.wall_s:.1f}"
            state = f"[{styles[s.state]}]{s.state}[/]" if s.state in styles else s.state
            table.add_row(str(i + 1), s.name, s.command, state, wall, s.artifact or "-")
        return table


def check_chain_dir(out: Path) -> None:
    """OUT must be empty, absent, or a chain folder (holding run.json); checked before any work."""
    from neodragon_cli.paths import check_creatable

    if out.exists() and not out.is_dir():
        raise ArtifactError(f"output {out} exists and is not a folder", hint="choose another -o path")
    if out.is_dir() and any(out.iterdir()) and not (out / RUN_FILE).is_file():
        raise ArtifactError(f"output folder {out} is not empty and holds no {RUN_FILE}", hint="choose another -o path for the chain")
    check_creatable(out)


def preview(plan: ChainPlan, out: Path) -> ChainRun:
    """The chain's state in OUT without running anything: cached steps as long as each parent is known."""
    run = ChainRun(plan, out, [StepStatus(s.name, s.kind.command, s.recipe) for s in plan.steps], status="preview")
    parent_id = content_id(plan.model)
    for step, status in zip(plan.steps, run.steps):
        folder = out / step.folder_name
        key, _ = step_key(step, parent_id)
        record = cached(step, folder, key)
        if record is None:
            break
        status.state, status.key, status.wall_s = "cached", key, record.get("wall_s")
        status.artifact, status.results = record.get("artifact"), record.get("results", {})
        if step.kind.operation is not None:
            parent_id = record["output"]
    return run


def run_chain(plan: ChainPlan, out: Path, *, from_step: str | None = None, until: str | None = None,
              on_change: Callable[[ChainRun], None] | None = None) -> ChainRun:  # fmt: skip
    """Run the plan into OUT (see the module docstring). Returns the run; a failing step's error is
    re-raised after run.json records it. OUT/report.md and report.json are written after every run
    (`chain_report.write_report`), whatever its end."""
    first = plan.index_of(from_step, "--from") if from_step else len(plan.steps)
    last = plan.index_of(until, "--until") if until else len(plan.steps) - 1
    if first < len(plan.steps) and first > last:
        raise UsageError(f"--from {from_step} comes after --until {until}")
    check_chain_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        run = _run_steps(plan, out, first, last, on_change)
    except BaseException:
        _report_after_failure(out)
        raise
    from neodragon_cli.pipelines.chain_report import write_report

    write_report(out)
    return run


def _report_after_failure(out: Path) -> None:
    """The report of a run a failed or stopped step ended; a problem writing it is printed, and the
    step's own error is the one raised."""
    from neodragon_cli.console import console
    from neodragon_cli.pipelines.chain_report import write_report

    if not (out / RUN_FILE).is_file():
        return
    try:
        write_report(out)
    except Exception as exc:  # noqa: BLE001 -- the step's error matters more; this one is shown, not hidden
        console.print(f"[yellow]the chain report was not written: {exc}[/]", highlight=False)


def _run_steps(plan: ChainPlan, out: Path, first: int, last: int, on_change: Callable[[ChainRun], None] | None) -> ChainRun:
    from neodragon_cli.artifacts import read_state, verify_artifact
    from neodragon_cli.atomic import write_json
    from neodragon_cli.console import console

    run = ChainRun(plan, out, [StepStatus(s.name, s.kind.command, s.recipe) for s in plan.steps])
    start = time.perf_counter()

    def save() -> None:
        run.wall_s = time.perf_counter() - start
        write_json(out / RUN_FILE, run.as_dict())
        if on_change is not None:
            on_change(run)

    save()
    parent, parent_id = plan.model, content_id(plan.model)
    for step, status in zip(plan.steps, run.steps):
        if step.index > last:
            break
        folder = out / step.folder_name
        key, parts = step_key(step, parent_id)
        status.key = key
        record = None if step.index >= first else cached(step, folder, key)
        if record is not None:
            status.state, status.wall_s = "cached", record.get("wall_s")
            status.artifact, status.results = record.get("artifact"), record.get("results", {})
        else:
            previous = read_step(folder)
            resume = step.index < first and previous is not None and previous.get("key") == key
            if not resume:  # another configuration or parent, or --from: start afresh
                shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True, exist_ok=True)
            step_record = {"format": STEP_FORMAT, "name": step.name, "command": step.kind.command, "key": key,
                           "key_parts": parts, "parent": str(parent), "config": step.config_text, "state": "running",
                           "started": _now()}  # fmt: skip
            write_json(folder / STEP_FILE, step_record)
            status.state = "running"
            save()
            console.rule(f"step {step.index + 1}/{len(plan.steps)}: {step.name} ({step.kind.command})"
                         + (" - resuming" if resume else ""))  # fmt: skip
            t0 = time.perf_counter()
            ctx = StepContext(parent, step.config, folder, resume, plan.source.parent, {s.name: out / s.folder_name for s in plan.steps})
            try:
                outcome = step.kind.run(ctx)
            except BaseException as exc:
                interrupted = isinstance(exc, KeyboardInterrupt)
                status.state = "stopped" if interrupted else "failed"
                status.wall_s = time.perf_counter() - t0
                status.error = "interrupted" if interrupted else (exc.one_line() if isinstance(exc, NeodragonError) else f"{type(exc).__name__}: {exc}")
                write_json(folder / STEP_FILE, {**step_record, "state": status.state, "error": status.error, "wall_s": status.wall_s})
                run.status = status.state
                save()
                raise
            status.wall_s = time.perf_counter() - t0
            status.results = outcome.results
            if outcome.stopped:
                status.state = run.status = "stopped"
                write_json(folder / STEP_FILE, {**step_record, "state": "stopped", "wall_s": status.wall_s, "results": outcome.results})
                save()
                return run
            output = None
            if outcome.artifact is not None:
                problems = verify_artifact(outcome.artifact)
                if problems:
                    raise ArtifactError(f"step {step.name} wrote an artifact that does not verify: {problems[0]}")
                output = read_state(outcome.artifact)["operations"][-1]["output"]
                status.artifact = str(Path(step.folder_name) / ARTIFACT_DIR)
            status.state = "ran"
            write_json(folder / STEP_FILE, {**step_record, "state": "ran", "finished": _now(), "wall_s": status.wall_s,
                                            "artifact": status.artifact, "output": output, "results": outcome.results})  # fmt: skip
            save()
        if step.kind.operation is not None:
            parent = out / status.artifact
            parent_id = read_step(folder)["output"]
    run.status = "complete" if last == len(plan.steps) - 1 else "partial"
    save()
    return run
