"""Drop-one guidance for MMDiT block pruning: the paper's Fig. 8, measured instead of judged by eye.

For every removable block k (all but the last, which ends the text stream), the calibration videos
are generated again by the model without block k (`PyramidFlowMMDiT.without_blocks([k])`), with the
same prompts, seeds and settings as the full model's videos. Each variant is scored

- by the Shapes judge of `neodragon eval` (`pipelines.eval.judge.judge`: Semantic, Quality, Total;
  only prompts the judge can read, i.e. Shapes captions, are judged), and
- by its agreement with the full model: PSNR (`pipelines.eval.metrics.psnr`) and SSIM
  (`pipelines.eval.metrics.ssim`, the stated substitute for LPIPS, whose weights are not shipped)
  between each variant video and the full model's video from the same seed.

Per block, `drop_one` holds the means over the videos, `psnr` pooled (10 log10(255^2 / mean MSE) over
all videos, as one clip; identical videos everywhere give `PSNR_IDENTICAL` instead of +inf, above any
finite 8-bit PSNR of a set of videos under 10^10 values), `total_drop` = full model's Total minus the
variant's, the generation seconds (wall and CPU) per video, and one row per video. A contact sheet per prompt (its
first video; rows: the full model, then each variant; columns: evenly spaced frames) is written as
`drop_one/prompt-NNN.png`.

The numbers are merged into the report folder's `scores.json` (`prune scores`; when there is none,
the block-importance scores are measured on the full model's videos of this run, which cost nothing
extra), so that `prune RECIPE` with `blocks.policy=guided` can read them.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from neodragon_cli.atomic import atomic_path
from neodragon_cli.errors import UsageError
from neodragon_cli.pipelines.distill.block_importance import (
    SCORES_FILE,
    CalibrationVideo,
    calibration_scores,
    calibration_videos,
    write_report,
)

SHEETS_DIR = "drop_one"
SHEET_FRAMES = 8  # columns of a contact sheet
PSNR_IDENTICAL = 200.0  # recorded instead of +inf (JSON has no inf)
LABEL_WIDTH = 120  # pixels of the row labels of a contact sheet


@dataclass
class VariantVideos:
    """Scores of one variant's calibration videos (the full model's too), in calibration order."""

    name: str
    rows: list[dict] = field(default_factory=list)
    thumbs: dict[int, tuple[list[int], np.ndarray]] = field(default_factory=dict)  # prompt -> (frame indices, frames)
    seconds: float = 0.0  # wall time of the generations
    cpu_seconds: float = 0.0  # their CPU (process) time: the steadier measure on a shared machine

    def summary(self) -> dict:
        def mean(key: str) -> float | None:
            values = [r[key] for r in self.rows if r.get(key) is not None]
            return float(np.mean(values)) if values else None

        out = {key: mean(key) for key in ("total", "quality", "semantic")}
        out["judged_videos"] = sum(r.get("total") is not None for r in self.rows)
        if self.rows and "mse" in self.rows[0]:
            mse = float(np.mean([r["mse"] for r in self.rows]))
            out["psnr"] = PSNR_IDENTICAL if mse == 0 else min(PSNR_IDENTICAL, 10 * math.log10(255.0**2 / mse))
            out["ssim"] = mean("ssim")
        out["seconds_per_video"] = self.seconds / max(1, len(self.rows))
        out["cpu_seconds_per_video"] = self.cpu_seconds / max(1, len(self.rows))
        return out


def _judged(prompt: str, frames: np.ndarray) -> dict:
    """Semantic / Quality / Total of the eval judge, or None values for a prompt it cannot read."""
    from neodragon_cli.pipelines.data.shapes import parse_prompt
    from neodragon_cli.pipelines.eval.judge import judge

    if not parse_prompt(prompt).objects:
        return {"semantic": None, "quality": None, "total": None}
    result = judge(frames, prompt)
    return {"semantic": result.semantic, "quality": result.quality, "total": result.total}


def sheet_frames(frames: np.ndarray, columns: int = SHEET_FRAMES) -> tuple[list[int], np.ndarray]:
    """(indices, frames) of `columns` evenly spaced frames (first and last included) of uint8 [T, H, W, 3]."""
    index = np.unique(np.linspace(0, len(frames) - 1, min(columns, len(frames))).round().astype(int))
    return [int(t) for t in index], np.ascontiguousarray(frames[index])


def contact_sheet(rows: Sequence[tuple[str, np.ndarray]], path: Path, frame_index: Sequence[int] | None = None) -> None:
    """A PNG grid: one row per (label, frames [n, H, W, 3]), the label at the left, frames left to right."""
    from PIL import Image, ImageDraw

    n, h, w = rows[0][1].shape[:3]
    header = 16 if frame_index is not None else 0
    sheet = Image.new("RGB", (LABEL_WIDTH + n * w, header + len(rows) * h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for j, t in enumerate(frame_index or []):
        draw.text((LABEL_WIDTH + j * w + 4, 2), f"frame {t}", fill=(0, 0, 0))
    for i, (label, frames) in enumerate(rows):
        top = header + i * h
        for line, text in enumerate(label.splitlines()):
            draw.text((4, top + 4 + 12 * line), text, fill=(0, 0, 0))
        for j, frame in enumerate(frames):
            sheet.paste(Image.fromarray(frame), (LABEL_WIDTH + j * w, top))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")


def _existing_report(report_dir: Path, model: Path, num_blocks: int, overwrite: bool) -> dict | None:
    """The `scores.json` the drop-one numbers merge into, checked before any video is made; None
    when the folder has none (then it must be empty or `overwrite` given)."""
    path = report_dir / SCORES_FILE
    if report_dir.exists() and not report_dir.is_dir():
        raise UsageError(f"report folder {report_dir} exists and is not a folder", hint="choose another -o path")
    if not path.is_file():
        if report_dir.is_dir() and any(report_dir.iterdir()) and not overwrite:
            raise UsageError(f"report folder {report_dir} is not empty and holds no {SCORES_FILE}",
                             hint="give the folder of `neodragon prune scores`, an empty folder, or --overwrite")
        return None
    try:
        report = json.loads(path.read_text())
        blocks = report["blocks"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{path} is not a block-importance report", hint="write one with `neodragon prune scores MODEL -o DIR`") from None
    if report.get("model") != str(model):
        raise UsageError(f"{path} scores another model ({report.get('model')})", hint="use a new report folder for this model")
    if len(blocks) != num_blocks:
        raise UsageError(f"{path} covers {len(blocks)} blocks, the MMDiT has {num_blocks}")
    if "drop_one" in report and not overwrite:
        raise UsageError(f"{path} already holds drop-one measurements", hint="pass --overwrite to measure them again")
    return report


def _agreement(frames: np.ndarray, reference: np.ndarray) -> dict:
    from neodragon_cli.pipelines.eval.metrics import psnr, ssim

    value = psnr(frames, reference)
    mse = 0.0 if math.isinf(value) else 255.0**2 / 10 ** (value / 10)
    small = min(frames.shape[1:3]) < 11  # SSIM's 11x11 window
    return {"psnr": PSNR_IDENTICAL if math.isinf(value) else value, "mse": mse,
            "ssim": None if small else ssim(frames, reference)}


def measure_drop_one(model: str | Path, prompts: Sequence[str], *, videos_per_prompt: int, seed: int,
                     report_dir: Path, settings=None, overwrite: bool = False,
                     progress: Callable[[str, int, int], None] | None = None,
                     log: Callable[[str], None] | None = None) -> dict:
    """Drop-one guidance of pipeline `model` (see the module docstring); returns the written report.
    `settings`: a `GenerationSettings` layer over the pipeline's defaults (fewer steps or frames for
    a cheap run). `progress(variant, done, total)` after each video; `log(line)` after each variant."""
    from neodragon_cli.artifacts import resolve_model
    from neodragon_cli.pipelines.flow.pipeline import VideoPipeline

    if not prompts:
        raise UsageError("no calibration prompts", hint="give a prompts file with one prompt per line")
    if videos_per_prompt < 1:
        raise UsageError(f"videos per prompt must be at least 1, got {videos_per_prompt}")
    folder = resolve_model(model)
    pipeline = VideoPipeline.from_pretrained(folder, safety_checker=False)
    full = pipeline.mmdit
    num_blocks = len(full.transformer_blocks)
    report = _existing_report(Path(report_dir), folder, num_blocks, overwrite)
    resolved = pipeline.settings(settings)
    pipeline.check(resolved)
    total = len(prompts) * videos_per_prompt
    prompt_index = {p: i for i, p in enumerate(prompts)}
    references: list[np.ndarray] = []

    def run(variant: VariantVideos, videos, reference: bool, elapsed: tuple[float, float] | None = None) -> None:
        start, start_cpu = time.perf_counter(), time.process_time()
        for done, video in enumerate(videos, 1):
            variant.seconds += time.perf_counter() - start
            variant.cpu_seconds += time.process_time() - start_cpu
            row = {"prompt": video.prompt, "sample": video.sample, "seed": video.seed, **_judged(video.prompt, video.frames)}
            if reference:
                references.append(video.frames)
            else:
                row.update(_agreement(video.frames, references[done - 1]))
            if video.sample == 0:
                variant.thumbs[prompt_index[video.prompt]] = sheet_frames(video.frames)
            variant.rows.append(row)
            if progress is not None:
                progress(variant.name, done, total)
            start, start_cpu = time.perf_counter(), time.process_time()
        if elapsed is not None:  # the videos were made before (with the block-importance hooks)
            variant.seconds, variant.cpu_seconds = elapsed
        if log is not None:
            count = len(variant.rows)
            log(f"{variant.name}: {count} videos, {variant.seconds / count:.2f} s per video (CPU {variant.cpu_seconds / count:.2f} s)")

    # The full model: reference videos, and block importance when the report folder has no scores yet.
    full_videos = VariantVideos("full model")
    arguments = {"videos_per_prompt": videos_per_prompt, "seed": seed, "settings": settings}
    if report is None:
        collected: list[CalibrationVideo] = []
        start, start_cpu = time.perf_counter(), time.process_time()
        blocks = calibration_scores(pipeline, prompts, **arguments, on_video=collected.append,
                                    progress=None if progress is None else (lambda d, n: progress("full model", d, n)))
        run(full_videos, iter(collected), reference=True,
            elapsed=(time.perf_counter() - start, time.process_time() - start_cpu))
        collected.clear()
        report = {"model": str(folder), "prompts": len(prompts), "videos_per_prompt": videos_per_prompt, "seed": seed,
                  "calibration": "the full model's videos of the drop-one run", "blocks": blocks}
    else:
        run(full_videos, calibration_videos(pipeline, prompts, **arguments, keep_frames=True), reference=True)

    variants: dict[int, VariantVideos] = {}
    try:
        for k in range(num_blocks - 1):
            pipeline.mmdit = full.without_blocks([k])
            variants[k] = VariantVideos(f"without block {k}")
            run(variants[k], calibration_videos(pipeline, prompts, **arguments, keep_frames=True), reference=False)
            pipeline.mmdit = full
    finally:
        pipeline.mmdit = full

    report_dir = Path(report_dir)
    sheets = []
    for p, prompt in enumerate(prompts):
        path = report_dir / SHEETS_DIR / f"prompt-{p:03d}.png"
        frame_index, frames = full_videos.thumbs[p]
        rows = [("full model", frames)]
        for k, variant in variants.items():
            agreement = variant.rows[p * videos_per_prompt]
            rows.append((f"without block {k}\nPSNR {agreement['psnr']:.1f} dB", variant.thumbs[p][1]))
        contact_sheet(rows, path, frame_index)
        sheets.append(str(path.relative_to(report_dir)))

    full_summary = full_videos.summary()
    for block in report["blocks"]:
        variant = variants.get(block["block"])
        if variant is None:
            block["drop_one"] = None  # the last block cannot be removed
            continue
        summary = variant.summary()
        drop = None if summary["total"] is None or full_summary["total"] is None else full_summary["total"] - summary["total"]
        block["drop_one"] = {**summary, "total_drop": drop,
                             "videos": [{k: v for k, v in r.items() if k != "mse"} for r in variant.rows]}
    report["drop_one"] = {
        "prompts": len(prompts), "videos_per_prompt": videos_per_prompt, "seed": seed,
        "settings": {"steps": list(resolved.video_steps), "first_steps": list(resolved.first_steps),
                     "frames": resolved.frames, "height": resolved.height, "width": resolved.width},
        "agreement": "PSNR and SSIM to the full model's video of the same seed (SSIM stands in for LPIPS)",
        "judge": "neodragon eval's Shapes judge (Semantic, Quality, Total); prompts it cannot read are not judged",
        "full_model": full_summary,
        "sheets": sheets,
    }
    blocks = report.pop("blocks")
    return write_report(report_dir, blocks, **{k: v for k, v in report.items() if k != "rank_correlation"})
