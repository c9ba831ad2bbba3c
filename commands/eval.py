"""`neodragon eval VIDEOS...`: Shapes-world judge scores and reconstruction metrics, as a table and JSON.

Each video's prompt comes from `--prompts` (JSON {name or stem: prompt}, or a text file with one
prompt per video in the order given), else from the metadata JSON beside it (`<stem>.json` with a
"prompt" key, as `generate` writes it), else from its file name VBench-style (`<prompt>-<i>.mp4`).
`--reference DIR` adds PSNR/SSIM against the video of the same name in DIR. `--fail-under KEY=VALUE`
exits 1 when the mean of KEY over all videos is below VALUE (for CI).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import typer

from neodragon_cli.errors import UsageError
from neodragon_cli.paths import check_output_file

from neodragon_cli.pipelines.eval.scoring import METRICS
from neodragon_cli.pipelines.eval.scoring import finite as _finite


def _suffixes() -> tuple[str, ...]:
    from neodragon_cli.pipelines.data.video_io import FFMPEG_SUFFIXES

    return FFMPEG_SUFFIXES + (".gif",)


def _threshold_keys() -> dict[str, str]:
    """Summary keys where higher is better (so a --fail-under threshold makes sense) → their metric."""
    from neodragon_cli.pipelines.eval.judge import ATTRIBUTES, QUALITY_PROXIES

    judge_keys = ("total", "quality", "semantic", *QUALITY_PROXIES, *ATTRIBUTES)
    return {**{k: "judge" for k in judge_keys}, "psnr": "psnr", "ssim": "ssim"}


def _collect_videos(paths: list[Path]) -> list[Path]:
    """Video files and PNG-frame folders named on the command line or found directly inside folders."""
    from neodragon_cli.pipelines.data.video_io import is_video_path

    suffixes = _suffixes()
    videos: list[Path] = []
    for path in paths:
        if not path.exists():
            raise UsageError(f"{path} does not exist")
        if path.is_file():
            if path.suffix.lower() not in suffixes:
                raise UsageError(f"{path} is not a video", hint=f"give {', '.join(suffixes)} files, PNG-frame folders, or folders of them")
            videos.append(path)
        elif any(path.glob("*.png")):
            videos.append(path)  # a folder of frames is one video
        else:
            found = sorted(p for p in path.iterdir() if (p.is_file() and p.suffix.lower() in suffixes) or (p.is_dir() and is_video_path(p)))
            if not found:
                raise UsageError(f"no videos in {path}", hint=f"expected {', '.join(suffixes)} files or PNG-frame folders")
            videos += found
    return videos


def _video_stem(path: Path) -> str:
    return path.name if path.is_dir() else path.stem


def _prompts_from_file(prompts_file: Path, videos: list[Path]) -> list[str | None]:
    if not prompts_file.is_file():
        raise UsageError(f"prompts file {prompts_file} does not exist")
    text = prompts_file.read_text()
    if prompts_file.suffix.lower() == ".json":
        try:
            table = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{prompts_file} is not valid JSON: {exc}") from exc
        if not isinstance(table, dict):
            raise UsageError(f"{prompts_file} must map video names (or stems) to prompts")
        return [table.get(v.name, table.get(_video_stem(v))) for v in videos]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != len(videos):
        raise UsageError(f"{prompts_file} has {len(lines)} prompts for {len(videos)} videos", hint="one prompt per line, in the order of the videos")
    return lines


def _prompt_beside(video: Path) -> str | None:
    """The "prompt" of `<stem>.json` beside the video, else a VBench-style file name's prompt."""
    from neodragon_cli.pipelines.data.shapes import parse_prompt

    meta = video.parent / f"{_video_stem(video)}.json"
    if meta.is_file():
        try:
            prompt = json.loads(meta.read_text()).get("prompt")
        except (json.JSONDecodeError, AttributeError) as exc:
            raise UsageError(f"metadata {meta} is not a JSON object with a 'prompt' key") from exc
        if prompt:
            return str(prompt)
    from_name = re.sub(r"-\d+$", "", _video_stem(video)).replace("_", " ")
    return from_name if parse_prompt(from_name).objects else None


def _reference_for(video: Path, reference_dir: Path) -> Path:
    exact = reference_dir / video.name
    if exact.exists():
        return exact
    stem = _video_stem(video)
    for candidate in sorted(reference_dir.glob(f"{stem}*")):
        if _video_stem(candidate) == stem and (candidate.is_dir() or candidate.suffix.lower() in _suffixes()):
            return candidate
    raise UsageError(f"no reference for {video.name} in {reference_dir}", hint="reference videos must have the same names")


def _parse_thresholds(items: list[str], metrics: set[str]) -> dict[str, float]:
    keys = _threshold_keys()
    thresholds = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in keys:
            raise UsageError(f"bad --fail-under '{item}'", hint=f"use KEY=VALUE with KEY one of {', '.join(keys)}")
        if keys[key] not in metrics:
            raise UsageError(f"--fail-under {key} needs the '{keys[key]}' metric", hint="add it with --metrics")
        try:
            thresholds[key] = float(value)
        except ValueError as exc:
            raise UsageError(f"bad --fail-under value '{value}' for {key}", hint="give a number, e.g. total=0.8") from exc
    return thresholds


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def eval_command(
    videos: list[Path] = typer.Argument(..., help="Videos (mp4, gif, ...), PNG-frame folders, or folders of them."),
    prompts: Path = typer.Option(None, "--prompts", help="JSON {video name or stem: prompt}, or a text file with one prompt per video."),
    metrics: str = typer.Option(None, "--metrics", help="Comma-separated from judge, psnr, ssim, lpips (default: judge, plus psnr,ssim with --reference)."),
    json_out: Path = typer.Option(None, "--json", help="Write the report as JSON to this file ('-' for stdout)."),
    fail_under: list[str] = typer.Option([], "--fail-under", help="KEY=VALUE, e.g. total=0.8: exit 1 if the mean of KEY is lower (repeatable)."),
    reference: Path = typer.Option(None, "--reference", help="Folder of reference videos with matching names (PSNR/SSIM/LPIPS)."),
    lpips_weights: Path = typer.Option(None, "--lpips-weights", help="Local torchvision AlexNet weights (alexnet-owt-7be5be79.pth) for LPIPS."),
    lpips_heads: Path = typer.Option(None, "--lpips-heads", help="Local LPIPS linear heads (lpips weights/v0.1/alex.pth); optional."),
) -> None:
    """Score videos: Shapes judge (Semantic, Quality, Total = (4·Quality + Semantic)/5) and PSNR/SSIM/LPIPS."""
    from neodragon_cli.atomic import write_json
    from neodragon_cli.console import console, progress
    from neodragon_cli.pipelines.data.video_io import read_video
    from neodragon_cli.pipelines.eval import metrics as video_metrics
    from neodragon_cli.pipelines.eval.scoring import score_frames, summarize

    if metrics is None:
        chosen = {"judge"} | ({"psnr", "ssim"} if reference else set())
    else:
        chosen = {m.strip() for m in metrics.split(",") if m.strip()}
        unknown = sorted(chosen - set(METRICS))
        if unknown or not chosen:
            raise UsageError(f"unknown metric '{unknown[0] if unknown else metrics}'", hint=f"choose from {', '.join(METRICS)}")
    if chosen & {"psnr", "ssim", "lpips"} and reference is None:
        raise UsageError("psnr, ssim and lpips compare against reference videos", hint="add --reference DIR")
    if reference is not None and not reference.is_dir():
        raise UsageError(f"reference folder {reference} does not exist")
    thresholds = _parse_thresholds(fail_under, chosen)
    if json_out is not None and str(json_out) != "-":
        check_output_file(json_out)
    lpips_model = None
    if "lpips" in chosen:
        if lpips_weights is None:
            raise UsageError("the lpips metric needs local AlexNet weights", hint="pass --lpips-weights PATH (nothing is downloaded)")
        lpips_model = video_metrics.LPIPS.from_files(lpips_weights, lpips_heads)

    files = _collect_videos(videos)
    prompt_list: list[str | None] = [None] * len(files)
    if "judge" in chosen:
        prompt_list = _prompts_from_file(prompts, files) if prompts else [_prompt_beside(v) for v in files]
        missing = [f.name for f, p in zip(files, prompt_list) if not p]
        if missing:
            raise UsageError(
                f"no prompt for {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""),
                hint="give --prompts FILE, or put <stem>.json with a 'prompt' key beside each video",
            )

    rows = []
    with progress() as bar:
        task = bar.add_task("evaluating", total=len(files))
        for path, prompt in zip(files, prompt_list):
            frames, fps = read_video(path)
            row: dict = {"video": str(path), "frames": int(frames.shape[0]), "fps": fps}
            ref_frames = None
            if reference is not None and chosen & {"psnr", "ssim", "lpips"}:
                ref_path = _reference_for(path, reference)
                ref_frames, _ = read_video(ref_path)
                row["reference"] = str(ref_path)
            row.update(score_frames(frames, prompt, chosen, ref_frames, lpips_model))
            rows.append(row)
            bar.advance(task)

    summary = summarize(rows, chosen)
    failed = {k: summary.get(k) for k, v in thresholds.items() if summary.get(k) is None or summary[k] < v}
    report = {
        "metrics": sorted(chosen),
        "summary": summary,
        "fail_under": thresholds,
        "failed": failed,
        "passed": not failed,
        "videos": rows,
    }
    _print_tables(rows, summary, chosen)
    if json_out is not None:
        if str(json_out) == "-":
            typer.echo(json.dumps(_finite(report), indent=2))
        else:
            write_json(json_out, _finite(report))
    if failed:
        for key, value in failed.items():
            console.print(f"[bold red]below threshold:[/] {key} = {_fmt(value)} < {thresholds[key]}", highlight=False)
        raise typer.Exit(1)


def _print_tables(rows: list[dict], summary: dict, chosen: set[str]) -> None:
    from rich.table import Table

    from neodragon_cli.console import console

    columns = [c for c in ("semantic", "quality", "total", "psnr", "ssim", "lpips") if c in summary]
    table = Table("video", *columns, title="per video")
    for row in rows:
        table.add_row(Path(row["video"]).name, *(_fmt(row.get(c)) for c in columns))
    console.print(table)
    table = Table("dimension", "mean", title=f"summary over {len(rows)} video{'s' * (len(rows) != 1)}")
    for key, value in summary.items():
        style = "bold" if key in ("total", "quality", "semantic") else None
        table.add_row(key, _fmt(value), style=style)
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
