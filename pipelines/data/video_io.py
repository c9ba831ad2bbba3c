"""Reading and writing videos: mp4 (H.264), GIF, and folders of PNG frames.

Frames are numpy uint8 arrays [T, H, W, 3] (RGB, 0..255); a single frame [H, W, 3] is accepted where
frames are appended. The format follows the path: `.mp4` → H.264 yuv420p through the ffmpeg binary
shipped with imageio-ffmpeg, `.gif` → GIF (pillow), no suffix → a folder of `00000.png, ...` plus
`video.json` (fps). Writes are atomic: frames go to a temporary sibling that is renamed onto the path
on success and removed on error, so a crash never leaves a half-written video behind.

mp4 output is byte-for-byte deterministic for identical frames (single-threaded x264, bitexact
muxing, no metadata such as creation time), which keeps generated artifacts hashable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from neodragon_cli.errors import ArtifactError, NeodragonError, UsageError

WRITE_FORMATS = ("mp4", "gif", "png")
#: Suffixes `read_video` decodes through ffmpeg (besides `.gif` and PNG folders).
FFMPEG_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")
PNG_META = "video.json"


def _ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def format_for(path: str | Path, format: str | None = None) -> str:
    """The write format for `path`: explicit `format`, else its suffix (no suffix → PNG folder)."""
    if format is not None:
        if format not in WRITE_FORMATS:
            raise UsageError(f"unknown video format '{format}'", hint=f"use one of {', '.join(WRITE_FORMATS)}")
        return format
    suffix = Path(path).suffix.lower()
    if suffix == "":
        return "png"
    if suffix[1:] in WRITE_FORMATS:
        return suffix[1:]
    raise UsageError(f"cannot write videos as '{suffix}' ({path})", hint="use .mp4, .gif, or a folder name for PNG frames")


def as_frames(frames) -> np.ndarray:
    """Validate frames as uint8 [T, H, W, 3] (a single [H, W, 3] frame becomes T = 1)."""
    array = np.asarray(frames)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise UsageError(f"video frames must be [T, H, W, 3], got shape {tuple(array.shape)}")
    if array.dtype != np.uint8:
        raise UsageError(f"video frames must be uint8, got {array.dtype}", hint="convert with to_uint8_frames()")
    return np.ascontiguousarray(array)


def to_uint8_frames(video) -> np.ndarray:
    """A float video [C, T, H, W] in [-1, 1] (torch tensor or array) → uint8 frames [T, H, W, 3]."""
    array = video.detach().float().cpu().numpy() if hasattr(video, "detach") else np.asarray(video, dtype=np.float32)
    if array.ndim != 4 or array.shape[0] != 3:
        raise UsageError(f"expected a video [3, T, H, W], got shape {tuple(array.shape)}")
    scaled = np.clip((array.transpose(1, 2, 3, 0) + 1.0) * 127.5, 0, 255)
    return np.round(scaled).astype(np.uint8)


class VideoWriter:
    """Streaming, atomic video writer.

        with VideoWriter("out.mp4", fps=24) as writer:
            for chunk in chunks:          # uint8 [t, H, W, 3] or [H, W, 3]
                writer.append(chunk)

    mp4 frames are piped to ffmpeg as they arrive; GIF frames are kept until `close()` (GIF needs a
    palette per frame and is meant for short clips); PNG frames are written one file each.
    """

    def __init__(self, path: str | Path, fps: float = 24, format: str | None = None, crf: int = 18):
        self.path = Path(path)
        self.fps = float(fps)
        if not self.fps > 0:
            raise UsageError(f"fps must be positive, got {fps}")
        self.format = format_for(self.path, format)
        self.crf = crf
        self.frame_count = 0
        self._size: tuple[int, int] | None = None
        self._gif_frames: list[np.ndarray] = []
        self._process: subprocess.Popen | None = None
        self._log = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.format == "png":
            self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent))
            os.chmod(self._tmp, 0o777 & ~_umask())
        else:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            os.close(fd)
            self._tmp = Path(tmp)
            os.chmod(self._tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual mode
        self._closed = False

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def append(self, frames) -> None:
        if self._closed:
            raise NeodragonError(f"video writer for {self.path} is already closed")
        frames = as_frames(frames)
        size = frames.shape[1:3]
        if self._size is None:
            self._size = size
            if self.format == "mp4":
                self._start_ffmpeg()
        elif size != self._size:
            raise UsageError(f"frame size changed from {self._size} to {size} while writing {self.path}")
        if self.format == "mp4":
            try:
                self._process.stdin.write(frames.tobytes())
            except BrokenPipeError:
                self._fail("ffmpeg stopped accepting frames")
        elif self.format == "gif":
            self._gif_frames.extend(frames)
        else:
            from PIL import Image

            for i, frame in enumerate(frames, start=self.frame_count):
                Image.fromarray(frame).save(self._tmp / f"{i:05d}.png")
        self.frame_count += len(frames)

    def _start_ffmpeg(self) -> None:
        height, width = self._size
        if height % 2 or width % 2:
            self.abort()
            raise UsageError(
                f"H.264 yuv420p needs even frame sizes, got {height}x{width} for {self.path}",
                hint="crop or pad to even sizes, or write a .gif / PNG folder",
            )
        command = [
            _ffmpeg(), "-hide_banner", "-loglevel", "error", "-y",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", f"{self.fps:g}", "-i", "-",
            "-an", "-c:v", "libx264", "-preset", "medium", "-crf", str(self.crf), "-pix_fmt", "yuv420p",
            # Determinism: one encoder thread, no version strings or timestamps in the container.
            "-threads", "1", "-fflags", "+bitexact", "-flags:v", "+bitexact", "-map_metadata", "-1",
            "-movflags", "+faststart", "-f", "mp4", str(self._tmp),
        ]  # fmt: skip
        self._log = tempfile.TemporaryFile()
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log)

    def _fail(self, what: str) -> None:
        detail = ""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._log.seek(0)
            detail = self._log.read().decode(errors="replace").strip().splitlines()[-1:]
            detail = f": {detail[0]}" if detail else ""
        self.abort()
        raise NeodragonError(f"writing {self.path} failed, {what}{detail}")

    def close(self) -> None:
        """Finish the file and rename it onto `path` (replacing an existing one)."""
        if self._closed:
            return
        if self.frame_count == 0:
            self.abort()
            raise UsageError(f"no frames were written to {self.path}")
        if self.format == "mp4":
            self._process.stdin.close()
            if self._process.wait() != 0:
                self._fail(f"ffmpeg exited with code {self._process.returncode}")
            self._log.close()
        elif self.format == "gif":
            _write_gif(self._tmp, self._gif_frames, self.fps)
        else:
            (self._tmp / PNG_META).write_text(json.dumps({"fps": self.fps, "frames": self.frame_count}) + "\n")
        self._closed = True
        _replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop everything written so far."""
        self._closed = True
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        if self._log is not None and not self._log.closed:
            self._log.close()
        if self._tmp.is_dir():
            shutil.rmtree(self._tmp, ignore_errors=True)
        elif self._tmp.exists():
            self._tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace(tmp: Path, path: Path) -> None:
    """Rename `tmp` onto `path`; an existing folder is moved aside first and deleted afterwards."""
    if path.is_dir():
        if tmp.is_file():
            tmp.unlink()
            raise ArtifactError(f"{path} is a folder; cannot replace it with a video file")
        trash = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, trash)
        os.replace(tmp, path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, path)


def _write_gif(path: Path, frames: list[np.ndarray], fps: float) -> None:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    # GIF delays are whole centiseconds; pillow takes milliseconds and rounds to 10 ms.
    duration = max(20, int(round(1000.0 / fps / 10.0)) * 10)
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0, optimize=False)


def write_video(path: str | Path, frames, fps: float = 24, format: str | None = None, crf: int = 18) -> Path:
    """Write uint8 frames [T, H, W, 3] as mp4 / GIF / PNG folder (see module docstring); returns the path.

    `crf` is the x264 constant-rate factor (lower = higher quality; 18 is visually lossless)."""
    frames = as_frames(frames)
    with VideoWriter(path, fps=fps, format=format, crf=crf) as writer:
        writer.append(frames)
    return Path(path)


def is_video_path(path: str | Path) -> bool:
    """True for a file `read_video` can decode, or a folder holding PNG frames."""
    path = Path(path)
    if path.is_dir():
        return any(path.glob("*.png"))
    return path.is_file() and path.suffix.lower() in FFMPEG_SUFFIXES + (".gif",)


def read_video(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode a video → (frames uint8 [T, H, W, 3], fps)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"video {path} does not exist")
    if path.is_dir():
        return _read_png_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        return _read_gif(path)
    if suffix not in FFMPEG_SUFFIXES:
        raise UsageError(f"cannot read '{suffix}' videos ({path})", hint=f"readable: {', '.join(FFMPEG_SUFFIXES)}, .gif, PNG folders")
    import imageio_ffmpeg

    try:
        reader = imageio_ffmpeg.read_frames(str(path))
        meta = next(reader)
        width, height = meta["size"]
        frames = [np.frombuffer(buf, dtype=np.uint8).reshape(height, width, 3) for buf in reader]
    except (RuntimeError, OSError, StopIteration) as exc:
        raise NeodragonError(f"cannot decode {path}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
    if not frames:
        raise NeodragonError(f"{path} holds no video frames")
    return np.stack(frames), float(meta["fps"])


def _read_gif(path: Path) -> tuple[np.ndarray, float]:
    from PIL import Image, ImageSequence

    with Image.open(path) as image:
        frames = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)]
        duration = image.info.get("duration") or 100
    return np.stack(frames), 1000.0 / duration


def _read_png_folder(path: Path) -> tuple[np.ndarray, float]:
    from PIL import Image

    files = sorted(path.glob("*.png"))
    if not files:
        raise UsageError(f"{path} is a folder without PNG frames")
    frames = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    meta = path / PNG_META
    fps = float(json.loads(meta.read_text()).get("fps", 24)) if meta.is_file() else 24.0
    return np.stack(frames), fps
