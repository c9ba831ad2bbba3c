"""MMDiT block importance (Neodragon §3.3): how much each transformer block changes its tokens.

For block k, `BI_k = (BI_k^v, BI_k^t)` with `BI = 1 - E[cos(input_k, output_k)]`, the cosine taken per
token over the channels, for the visual tokens (every video token of the column, history included)
and the valid text tokens separately, the expectation over tokens, denoising steps and videos. The
last block has no text output (it is context-pre-only), so it has no text score. A block that leaves
its tokens unchanged scores 0; pruning removes the blocks that score lowest.

Scores are collected with forward hooks on the blocks while real videos are generated from
calibration prompts. Under classifier-free guidance one MMDiT call holds both passes ([negative;
positive] rows, `sampler.py`); text scores are also kept per pass (`uncond`, `cond`).

Whether the two scores agree (the paper: they do not) is measured by their Spearman rank correlation
over the blocks that have both, written into every report (`rank_correlation`).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from neodragon_cli.atomic import write_json
from neodragon_cli.errors import UsageError

SCORES_FILE = "scores.json"
CHART_FILE = "block_importance.png"
PASSES = ("uncond", "cond")

# (block index, positional inputs of the block's forward, its output (x, c or None))
BlockCall = Callable[[int, tuple, tuple], None]


@contextmanager
def block_calls(mmdit, on_call: BlockCall) -> Iterator[None]:
    """Call `on_call(k, args, output)` after every forward of transformer block k of `mmdit`.
    args = (x [b, N, D], c [b, L, D], temb, text_valid [b, L] bool, rope, frame_sizes);
    output = (x [b, N, D], c [b, L, D] or None for the last block)."""
    handles = [block.register_forward_hook(lambda _, args, out, k=k: on_call(k, args, out))
               for k, block in enumerate(mmdit.transformer_blocks)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def token_cosines(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Per-token cosine similarity [b, n] of [b, n, D] token tensors, computed in float64."""
    return F.cosine_similarity(before.double(), after.double(), dim=-1, eps=1e-12)


@dataclass
class _Mean:
    total: float = 0.0
    count: int = 0

    def add(self, values: torch.Tensor) -> None:
        self.total += float(values.sum())
        self.count += values.numel()

    @property
    def value(self) -> float | None:
        return None if self.count == 0 else self.total / self.count


@dataclass
class ImportanceAccumulator:
    """Running means of the per-token cosines of every block, visual and text, per CFG pass.

    `rows_per_pass`: rows of one pass in an MMDiT call (the videos generated together); a call with
    twice as many rows is a CFG call [uncond; cond], one with as many is a conditional call."""

    num_blocks: int
    rows_per_pass: int = 1
    visual: dict[str, list[_Mean]] = field(default_factory=dict)
    text: dict[str, list[_Mean]] = field(default_factory=dict)

    def __post_init__(self):
        for stats in (self.visual, self.text):
            for name in PASSES:
                stats[name] = [_Mean() for _ in range(self.num_blocks)]

    def __call__(self, k: int, args: tuple, output: tuple) -> None:
        x_in, c_in, _, text_valid = args[:4]
        x_out, c_out = output
        rows = x_in.shape[0]
        passes = PASSES if rows == 2 * self.rows_per_pass else PASSES[1:]
        with torch.no_grad():
            visual = token_cosines(x_in, x_out).chunk(len(passes))
            text = token_cosines(c_in, c_out).chunk(len(passes)) if c_out is not None else None
            valid = text_valid.chunk(len(passes))
            for i, name in enumerate(passes):
                self.visual[name][k].add(visual[i])
                if text is not None:
                    self.text[name][k].add(text[i][valid[i]])

    def scores(self) -> list[dict]:
        """One entry per block: `visual` and `text` (1 - mean cosine over both passes; text None for
        the last block), and `text_per_pass` {uncond, cond} (None for a pass never seen)."""

        def score(means: Sequence[_Mean]) -> float | None:
            total, count = sum(m.total for m in means), sum(m.count for m in means)
            return None if count == 0 else 1.0 - total / count

        blocks = []
        for k in range(self.num_blocks):
            per_pass = {name: score([self.text[name][k]]) for name in PASSES}
            blocks.append({
                "block": k,
                "visual": score([self.visual[name][k] for name in PASSES]),
                "text": score([self.text[name][k] for name in PASSES]),
                "text_per_pass": per_pass,
            })
        return blocks


@dataclass
class CalibrationVideo:
    prompt: str
    sample: int  # video index within the prompt
    seed: int  # sample_seed(seed, prompt, sample)
    frames: object  # uint8 [T, H, W, 3] (numpy) when kept, else None


def calibration_videos(pipeline, prompts: Sequence[str], *, videos_per_prompt: int, seed: int, settings=None,
                       keep_frames: bool = False) -> Iterator[CalibrationVideo]:
    """Generate `videos_per_prompt` videos of each prompt with the pipeline's defaults overlaid with
    `settings` (a `GenerationSettings` layer or None), video i of a prompt seeded by
    `sample_seed(seed, prompt, i)`, yielding each once made (frames only with `keep_frames`).
    UsageError for an empty prompt list or fewer than one video per prompt."""
    from neodragon_cli.pipelines.flow.pipeline import sample_seed

    if not prompts:
        raise UsageError("no calibration prompts", hint="give a prompts file with one prompt per line")
    if videos_per_prompt < 1:
        raise UsageError(f"videos per prompt must be at least 1, got {videos_per_prompt}")
    resolved = pipeline.settings(settings)
    pipeline.check(resolved)
    for prompt in prompts:
        for i in range(videos_per_prompt):
            video_seed = sample_seed(seed, prompt, i)
            sink = None if keep_frames else (lambda frames: None)
            result = pipeline.generate(prompt, resolved, seed=video_seed, sink=sink)
            yield CalibrationVideo(prompt, i, video_seed, result.frames)


def calibration_scores(pipeline, prompts: Sequence[str], *, videos_per_prompt: int, seed: int,
                       progress: Callable[[int, int], None] | None = None, settings=None,
                       on_video: Callable[[CalibrationVideo], None] | None = None) -> list[dict]:
    """Block importance of `pipeline.mmdit` over the videos of `calibration_videos` (same arguments;
    with `on_video`, each video is handed to it with its frames). `progress(done, total)` is called
    after each video. UsageError for an empty prompt list."""
    accumulator = ImportanceAccumulator(len(pipeline.mmdit.transformer_blocks))
    total = len(prompts) * videos_per_prompt
    videos = calibration_videos(pipeline, prompts, videos_per_prompt=videos_per_prompt, seed=seed, settings=settings,
                                keep_frames=on_video is not None)
    with block_calls(pipeline.mmdit, accumulator):
        for done, video in enumerate(videos, 1):
            if on_video is not None:
                on_video(video)
            if progress is not None:
                progress(done, total)
    return accumulator.scores()


def rank_correlation(blocks: list[dict]) -> dict:
    """{"spearman_visual_text": rho, "blocks": n}: the Spearman rank correlation between the visual
    and the text scores of the n blocks that have both (every block but the last; ties get their
    average rank); rho is None with fewer than 3 such blocks or a constant score."""
    from scipy.stats import spearmanr

    pairs = [(b["visual"], b["text"]) for b in blocks if b.get("visual") is not None and b.get("text") is not None]
    rho = None
    if len(pairs) >= 3 and len({v for v, _ in pairs}) > 1 and len({t for _, t in pairs}) > 1:
        rho = float(spearmanr([v for v, _ in pairs], [t for _, t in pairs])[0])
    return {"spearman_visual_text": rho, "blocks": len(pairs)}


def write_report(folder: Path, blocks: list[dict], **provenance) -> dict:
    """`scores.json` ({**provenance, "rank_correlation": {...}, "blocks": [...]}) and the bar chart
    `block_importance.png` (visual and text score per block, as the paper's Fig. 7) in `folder`;
    returns the JSON (`rank_correlation`: see `rank_correlation`)."""
    report = {**provenance, "rank_correlation": rank_correlation(blocks), "blocks": blocks}
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / SCORES_FILE, report)
    plot_scores(blocks, folder / CHART_FILE)
    return report


def plot_scores(blocks: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    index = [b["block"] for b in blocks]
    width = 0.4
    figure, axis = plt.subplots(figsize=(max(6.0, 0.45 * len(blocks)), 3.5))
    axis.bar([i - width / 2 for i in index], [b["visual"] or 0.0 for b in blocks], width, label="visual $BI^v$")
    axis.bar([i + width / 2 for i in index], [b["text"] or 0.0 for b in blocks], width, label="text $BI^t$")
    axis.set_xlabel("MMDiT block")
    axis.set_ylabel("1 - E[cos(input, output)]")
    axis.set_xticks(index)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def read_scores(path: Path) -> list[dict]:
    """The blocks of a `scores.json` (UsageError when it is missing or not a scores report)."""
    try:
        report = json.loads(Path(path).read_text())
        return report["blocks"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{path} is not a block-importance report", hint="write one with `neodragon prune scores MODEL -o DIR`") from None
