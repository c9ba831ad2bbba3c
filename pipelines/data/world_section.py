"""The `world:` recipe section of the Shapes training commands: which Shapes world the data come from."""

from __future__ import annotations

from dataclasses import dataclass

from neodragon_cli.pipelines.data.shapes import ShapesWorld
from neodragon_cli.recipes import setting


@dataclass
class WorldSection:
    height: int = setting(128, "canvas height (multiple of 64)")
    width: int = setting(128, "canvas width (multiple of 64)")
    frames: int = setting(49, "frames per video (1 + 8k)")
    split: str = setting("train", "scene split the training data comes from")
    seed: int = setting(0, "data seed (video i is a pure function of (seed, i))")

    def validate(self) -> list[str]:
        problems = [f"{k} must be a multiple of 64" for k in ("height", "width") if getattr(self, k) % 64]
        if (self.frames - 1) % 8:
            problems.append("frames must be of the form 1 + 8k")
        return problems

    def world(self) -> ShapesWorld:
        return ShapesWorld(height=self.height, width=self.width, frames=self.frames)
