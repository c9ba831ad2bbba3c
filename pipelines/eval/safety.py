"""Safety check of generated videos, as the official Neodragon inference script has it.

diffusers' `StableDiffusionSafetyChecker` and a transformers `CLIPImageProcessor` are read from one
local folder in the layout of `CompVis/stable-diffusion-safety-checker` (config.json, the weights,
preprocessor_config.json) and run on `count` frames spread evenly over the video
(`round(linspace(0, T - 1, count))`; one frame means frame 0). The checker runs in float32: its
verdict is a threshold on cosine scores, and it is small next to the video model.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from neodragon_cli.errors import CheckpointError
from neodragon_cli.registry import register

WEIGHTS_NAMES = ("model.safetensors", "pytorch_model.bin")
PREPROCESSOR_FILE = "preprocessor_config.json"
CHECKER_LOGGER = "diffusers.pipelines.stable_diffusion.safety_checker"


def folder_problem(path: Path) -> str | None:
    """Why `path` is not a safety checker folder (None when it looks like one)."""
    if not path.is_dir():
        return f"safety checker folder {path} does not exist"
    missing = [name for name in ("config.json", PREPROCESSOR_FILE) if not (path / name).is_file()]
    if not any((path / name).is_file() for name in WEIGHTS_NAMES):
        missing.append(" or ".join(WEIGHTS_NAMES))
    if missing:
        return f"{path} is not a safety checker folder: no {', '.join(missing)}"
    return None


def looks_like_safety_checker(path: Path) -> bool:
    return folder_problem(Path(path)) is None


def frame_indices(num_frames: int, count: int) -> list[int]:
    """`count` frame indices spread evenly over `num_frames` frames (the first and last included)."""
    count = max(1, min(count, num_frames))
    return sorted({int(i) for i in np.linspace(0, num_frames - 1, count).round()})


@dataclass
class SafetyVerdict:
    """The checked frames, and those the checker flagged."""

    frames: list[int]
    flagged_frames: list[int] = field(default_factory=list)

    @property
    def flagged(self) -> bool:
        return bool(self.flagged_frames)

    def reason(self) -> str:
        return f"the safety checker flagged frame(s) {', '.join(map(str, self.flagged_frames))} of the {len(self.frames)} checked"

    def as_dict(self) -> dict:
        verdict = {"checked_frames": self.frames, "flagged": self.flagged, "flagged_frames": self.flagged_frames}
        return verdict | ({"reason": self.reason()} if self.flagged else {})


@contextmanager
def _quiet_transformers():
    """No loading progress bars or backend notices from transformers while the checker loads."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@register("safety", "sd-safety-checker", description="Stable Diffusion safety checker (CLIP ViT + concept embeddings)",
          detect=looks_like_safety_checker)  # fmt: skip
class SafetyChecker:
    """A `StableDiffusionSafetyChecker` with its CLIP image processor; `check(frames)` -> flags."""

    def __init__(self, model, processor):
        self.model, self.processor = model, processor

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "SafetyChecker":
        """Load the folder (CheckpointError when it is not a safety checker folder or does not load)."""
        path = Path(path)
        problem = folder_problem(path)
        if problem is not None:
            raise CheckpointError(problem, hint="give a folder like CompVis/stable-diffusion-safety-checker")
        try:
            with _quiet_transformers():  # the processor class is picked (PIL or torchvision backend) on import
                from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
                from transformers import CLIPImageProcessor

                model = StableDiffusionSafetyChecker.from_pretrained(path, torch_dtype=torch.float32)
                processor = CLIPImageProcessor.from_pretrained(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot load the safety checker in {path}: {str(exc).splitlines()[0]}") from None
        return cls(model.eval(), processor)

    def to(self, device: torch.device | str) -> "SafetyChecker":
        self.model.to(device)
        return self

    def eval(self) -> "SafetyChecker":
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def check(self, frames: np.ndarray, indices: list[int]) -> SafetyVerdict:
        """Check uint8 frames [n, H, W, 3] (the video's frames `indices`)."""
        pixels = self.processor(images=list(frames), return_tensors="pt").pixel_values.to(self.device, torch.float32)
        checker_log = logging.getLogger(CHECKER_LOGGER)
        level = checker_log.level
        checker_log.setLevel(logging.ERROR)  # the checker warns about the black images we never use
        try:
            with torch.no_grad():
                _, flags = self.model(clip_input=pixels, images=frames.astype(np.float32) / 255)
        finally:
            checker_log.setLevel(level)
        return SafetyVerdict(list(indices), [i for i, flag in zip(indices, flags) if flag])
