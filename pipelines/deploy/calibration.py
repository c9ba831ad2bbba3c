"""Calibration data for `quantize`: the inputs every exported graph really sees while generating videos.

    recording = record_graph_inputs(export_folder, prompts, seed=0)     # {graph: [feed, ...]}
    feeds = pick(recording.feeds["mmdit_stage2"], 300)                 # evenly spread over the run

The float export runs as a whole pipeline in ONNX Runtime (`runtime.load_onnx_pipeline`) with every
session wrapped in a `RecordingSession`, so each graph's feeds are exactly what the host hands it
during generation at the pipeline's default settings (steps, guidance, history noise): stage graphs
get their host inputs (attention bias, RoPE, padded history) for every denoising step of both CFG rows,
the streaming decoder its carried states. Two graphs are not called by text-to-video generation and
are fed what they see in the pipeline's other uses: `vae_encoder` (the hybrid first frame) gets the
generated frames at the video size (under SR, the decoder's frames before it), one per call, in [-1, 1]; `sr` the decoded frames in [0, 1] (it is called when the
export has an `sr` graph, and its inputs are recorded as the pipeline hands them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from neodragon_cli.errors import UsageError
from neodragon_cli.pipelines.deploy import onnx_tools

# the paper's calibration sizes (Table 9), by graph-name prefix; other graphs get DEFAULT_SIZE
PAPER_SIZES = {"vae_encoder": 50, "decoder": 50, "mmdit_stage": 300, "sr": 500}
DEFAULT_SIZE = 50


def paper_size(graph: str) -> int:
    return next((n for prefix, n in PAPER_SIZES.items() if graph.startswith(prefix)), DEFAULT_SIZE)


class RecordingSession:
    """An ONNX Runtime session that keeps a copy of every feed it runs (`feeds`)."""

    def __init__(self, session):
        self.session = session
        self.feeds: list[dict[str, np.ndarray]] = []

    def run(self, output_names, feed, *args, **kwargs):
        self.feeds.append({name: np.array(value, copy=True) for name, value in feed.items()})
        return self.session.run(output_names, feed, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.session, name)


@dataclass
class Recording:
    """Feeds per graph name, in call order, and the videos they came from."""

    feeds: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)
    videos: list[np.ndarray] = field(default_factory=list)  # uint8 [T, H, W, 3]

    def counts(self) -> dict[str, int]:
        return {name: len(feeds) for name, feeds in sorted(self.feeds.items())}


def record_graph_inputs(folder: Path, prompts: list[str], *, seed: int = 0, graphs: list[str] | None = None,
                        settings=None, enough: Callable[[dict[str, int]], bool] | None = None,
                        progress: Callable[[int, int], None] | None = None) -> Recording:  # fmt: skip
    """Generate one video per prompt (seeds seed, seed+1, ...) with the float graphs of export `folder`
    and record every graph's inputs; stop early once `enough(counts per graph)` holds. `graphs`: the
    graph names to keep (default: all); `settings`: a `GenerationSettings` over the export's defaults."""
    from neodragon_cli.pipelines.deploy.runtime import load_onnx_pipeline

    if not prompts:
        raise UsageError("no calibration prompts", hint="give a prompts file with one prompt per line")
    sessions: dict[str, RecordingSession] = {}

    def factory(path: Path) -> RecordingSession:
        sessions[Path(path).name.removesuffix(".onnx")] = wrapped = RecordingSession(onnx_tools.session(path))
        return wrapped

    pipe = load_onnx_pipeline(folder, factory)
    resolved = recording_settings(pipe, settings)
    recording = Recording()
    for i, prompt in enumerate(prompts):
        recording.videos.append(pipe.generate(prompt, resolved, seed=seed + i).frames)
        recording.feeds = {name: session.feeds for name, session in sessions.items()}
        if "vae_encoder" in sessions:
            recording.feeds["vae_encoder"] = [{"video": frames_to_encoder_input(f)} for f in _encoder_size_frames(recording, sessions)]
        if graphs is not None:
            recording.feeds = {name: feeds for name, feeds in recording.feeds.items() if name in graphs}
        if progress is not None:
            progress(i + 1, len(prompts))
        if enough is not None and enough(recording.counts()):
            break
    return recording


def recording_settings(pipe, settings=None):
    """The export's default settings (under `settings`), with SR on when the export has an sr graph."""
    from neodragon_cli.pipelines.flow.settings import GenerationSettings

    layers = [] if settings is None else [settings]
    if pipe.sr is not None:
        layers.append(GenerationSettings(sr=True))
    return pipe.settings(*layers)


def save_recording(recording: Recording, folder: Path, meta: dict) -> None:
    """`folder/<graph>.safetensors` (feed i's input x as "i/x"), `videos.npy` and `recording.json` (meta + counts)."""
    from safetensors.numpy import save_file

    from neodragon_cli.atomic import write_json

    folder.mkdir(parents=True, exist_ok=True)
    for name, feeds in recording.feeds.items():
        save_file({f"{i}/{k}": np.ascontiguousarray(v) for i, feed in enumerate(feeds) for k, v in feed.items()},
                  str(folder / f"{name}.safetensors"))  # fmt: skip
    np.save(folder / "videos.npy", np.stack(recording.videos))
    write_json(folder / "recording.json", {**meta, "counts": recording.counts()})


def load_recording(folder: Path) -> tuple[Recording, dict]:
    """What `save_recording` wrote: (recording, meta). UsageError when `folder` holds none."""
    from safetensors.numpy import load_file

    meta_path = Path(folder) / "recording.json"
    if not meta_path.is_file():
        raise UsageError(f"no calibration data in {folder} (no recording.json)", hint="record it with --save-calibration")
    meta = json.loads(meta_path.read_text())
    recording = Recording(videos=list(np.load(Path(folder) / "videos.npy")))
    for name, count in meta["counts"].items():
        tensors = load_file(str(Path(folder) / f"{name}.safetensors"))
        feeds = [{} for _ in range(count)]
        for key, value in tensors.items():
            index, _, input_name = key.partition("/")
            feeds[int(index)][input_name] = value
        recording.feeds[name] = feeds
    return recording, meta


def _encoder_size_frames(recording: Recording, sessions: dict) -> list[np.ndarray]:
    """uint8 [H, W, 3] frames at the video size the encoder takes: the generated ones, or, when the
    export upscales them (sr), the decoder's frames before SR, which are the sr graph's inputs."""
    if "sr" not in sessions:
        return [frame for video in recording.videos for frame in video]
    frames = []
    for feed in sessions["sr"].feeds:
        (batch,) = feed.values()  # [n, 3, H, W] in [0, 1]
        frames.extend((np.clip(batch, 0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1))
    return frames


def frames_to_encoder_input(frame: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [1, 3, 1, H, W] in [-1, 1] (what the first-frame encoder takes)."""
    return (frame.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)[None, :, None].copy()


def pick(feeds: list, count: int) -> list:
    """`count` feeds spread evenly over the run (all of them when there are fewer)."""
    if count >= len(feeds):
        return list(feeds)
    return [feeds[i] for i in np.linspace(0, len(feeds) - 1, count).round().astype(int)]
