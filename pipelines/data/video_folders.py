"""Real video folders as training clips: an annotation file lists the videos, each clip is a random
window of `patch = [frames, height, width]` decoded with imageio-ffmpeg.

Annotation formats: Pyramid-Flow's `.jsonl` (one object per line with `video` and `text`) and
OpenSora's `.csv` (columns `path` and `text`). Relative video paths are read from `root` (default:
the annotation file's folder).

Clip i is a pure function of (seed, i): a video, a first frame and a crop position drawn from
`numpy.random.default_rng((seed, i))`. Each video is scaled (antialiased) so that it just covers the
patch, then cropped. Clips are float tensors `[3, frames, height, width]` in [-1, 1].
"""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from neodragon_cli.console import console
from neodragon_cli.errors import UsageError
from neodragon_cli.pipelines.data.video_io import FFMPEG_SUFFIXES

ANNOTATION_COLUMNS = {".jsonl": "video", ".csv": "path"}


@dataclass(frozen=True)
class VideoInfo:
    """A readable video: its path, frame count and frame size."""

    path: Path
    frames: int
    height: int
    width: int


def read_annotations(annotations: str | Path, root: str | Path = "") -> list[Path]:
    """The video paths of a `.jsonl` (key `video`) or `.csv` (column `path`) annotation file."""
    annotations = Path(annotations)
    column = ANNOTATION_COLUMNS.get(annotations.suffix.lower())
    if column is None:
        raise UsageError(f"unknown annotation format '{annotations.suffix}' ({annotations})",
                         hint="give a Pyramid-Flow .jsonl (video, text) or an OpenSora .csv (path, text)")
    if not annotations.is_file():
        raise UsageError(f"annotation file {annotations} does not exist")
    base = Path(root) if root else annotations.parent
    if annotations.suffix.lower() == ".jsonl":
        rows = [json.loads(line) for line in annotations.read_text().splitlines() if line.strip()]
    else:
        with open(annotations, newline="") as fh:
            rows = list(csv.DictReader(fh))
    missing = [i for i, row in enumerate(rows) if not row.get(column)]
    if missing:
        raise UsageError(f"{annotations}: row {missing[0] + 1} has no '{column}'")
    return [base / row[column] for row in rows]


def probe_video(path: Path) -> VideoInfo | None:
    """Frame count and size of a video ffmpeg can decode, else None."""
    import imageio_ffmpeg

    if not path.is_file() or path.suffix.lower() not in FFMPEG_SUFFIXES:
        return None
    try:
        reader = imageio_ffmpeg.read_frames(str(path))
        width, height = next(reader)["size"]
        reader.close()
        frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    except (RuntimeError, OSError, StopIteration):
        return None
    return VideoInfo(path, int(frames), int(height), int(width)) if frames else None


def read_frames(path: Path, start: int, count: int) -> np.ndarray:
    """uint8 frames [count, H, W, 3] from frame `start` on (decoding stops after the last one)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    width, height = next(reader)["size"]
    frames = [np.frombuffer(buf, np.uint8).reshape(height, width, 3) for buf in itertools.islice(reader, start, start + count)]
    reader.close()
    return np.stack(frames)


class VideoFolderClips:
    """Random clips of the videos an annotation file lists (see the module docstring).

    Videos that do not decode or are shorter than the patch are left out with a note; none left is a
    UsageError."""

    def __init__(self, annotations: str | Path, patch: tuple[int, int, int], seed: int, root: str | Path = ""):
        self.patch, self.seed = tuple(patch), seed
        paths = read_annotations(annotations, root)
        probed = [probe_video(p) for p in paths]
        self.videos = [v for v in probed if v is not None and v.frames >= self.patch[0]]
        skipped = len(paths) - len(self.videos)
        if not self.videos:
            raise UsageError(f"{annotations}: none of its {len(paths)} videos decodes into {self.patch[0]} frames or more",
                             hint="check the video paths (relative to data.root) and the patch's frame count")
        if skipped:
            console.print(f"{annotations}: {skipped} of {len(paths)} videos unreadable or shorter than {self.patch[0]} frames, left out")

    def __call__(self, index: int) -> torch.Tensor:
        """Clip `index`: [3, frames, height, width] in [-1, 1]."""
        frames, height, width = self.patch
        rng = np.random.default_rng((self.seed, index))
        video = self.videos[int(rng.integers(len(self.videos)))]
        start = int(rng.integers(video.frames - frames + 1))
        pixels = torch.from_numpy(read_frames(video.path, start, frames)).permute(0, 3, 1, 2).float()
        scale = max(height / video.height, width / video.width)
        size = (max(height, round(video.height * scale)), max(width, round(video.width * scale)))
        if size != (video.height, video.width):
            pixels = F.interpolate(pixels, size=size, mode="bilinear", antialias=True, align_corners=False)
        top, left = int(rng.integers(size[0] - height + 1)), int(rng.integers(size[1] - width + 1))
        clip = pixels[:, :, top : top + height, left : left + width]
        return (clip / 127.5 - 1).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()
