"""Scores of a set of videos as `neodragon eval` reports them: per video the Shapes judge (Semantic,
Quality, Total, each attribute, the quality proxies) and, against a reference video, PSNR / SSIM /
LPIPS; over the set the mean of each (`summarize`). The chain's eval steps score with the same code."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

METRICS = ("judge", "psnr", "ssim", "lpips")


def score_frames(frames: np.ndarray, prompt: str | None, metrics: set[str] | frozenset[str],
                 reference: np.ndarray | None = None, lpips_model=None) -> dict:  # fmt: skip
    """One video's row: the judge's result for `prompt` (with "judge" in `metrics`) and the
    reconstruction metrics against `reference` frames (when given)."""
    from neodragon_cli.pipelines.eval import judge as shapes_judge
    from neodragon_cli.pipelines.eval import metrics as video_metrics

    row: dict = {}
    if "judge" in metrics:
        row.update(prompt=prompt, **shapes_judge.judge(frames, prompt).to_dict())
    if reference is not None:
        if "psnr" in metrics:
            row["psnr"] = video_metrics.psnr(frames, reference)
        if "ssim" in metrics:
            row["ssim"] = video_metrics.ssim(frames, reference)
        if "lpips" in metrics:
            row["lpips"] = video_metrics.lpips(frames, reference, None, model=lpips_model)
    return row


def mean(values: list[float | None]) -> float | None:
    """Mean of the known values (+inf stays: the mean PSNR of identical videos is +inf)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def summarize(rows: list[dict], metrics: set[str] | frozenset[str]) -> dict[str, float | None]:
    """Means over the rows: total, quality, semantic, each quality proxy and each attribute kind
    (colour, shape, size, motion, count, background, relation: the share judged right), and the
    reconstruction metrics."""
    from neodragon_cli.pipelines.eval import judge as shapes_judge

    summary: dict[str, float | None] = {}
    if "judge" in metrics:
        for key in ("total", "quality", "semantic"):
            summary[key] = mean([r[key] for r in rows])
        for key in shapes_judge.QUALITY_PROXIES:
            summary[key] = mean([r["proxies"][key] for r in rows])
        for kind in shapes_judge.ATTRIBUTES:
            judged = [float(ok) for r in rows for name, ok in r["attributes"].items() if shapes_judge.attribute_kind(name) == kind]
            summary[kind] = mean(judged)
    for key in ("psnr", "ssim", "lpips"):
        if key in metrics:
            summary[key] = mean([r.get(key) for r in rows])
    return summary


def finite(obj):
    """JSON cannot hold inf/nan: they become null (PSNR of identical videos is +inf)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj
