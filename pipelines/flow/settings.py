"""Sampling settings, defined once.

`SamplingConfig` is the one definition of the sampler's knobs (steps, guidance, history noise): their
types, defaults and documentation. Everything else derives from it:

  * `GenerationSettings` (a whole video: mode, size, frames, ... plus every knob of `SamplingConfig`)
    is a layer where every field may be unset; `resolved()` fills unset knobs from `SamplingConfig`'s
    defaults;
  * the `generate` recipe's `sampling` section is a `GenerationSettings`;
  * a training recipe that records the sampling defaults of the pipeline it ships uses `SamplingConfig`
    itself as its section, and turns it into the pipeline's settings with `GenerationSettings.from_config`.

This module imports no torch (the CLI reads these schemas at start-up); step strings are checked with
the scheduler's `parse_steps`, imported when a check runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from neodragon_cli.recipes import recipe_schema, setting

PYRAMID_FLOW_NEGATIVE = (
    "cartoon style, worst quality, low quality, blurry, absolute black, absolute white, low res, extra limbs, "
    "extra digits, misplaced objects, mutated anatomy, monochrome, horror"
)
# the official script's --use_cinematic_prompt_modifier (appended to every prompt, never in file names)
CINEMATIC_MODIFIER = ", cinematic, realistic textures, high detail, natural colours"
# the latent grid must allow two halvings and whole 2x2 patches: 8 (VAE) * 4 (pyramid) * 2 (patch)
SIZE_MULTIPLE = 64


@dataclass(frozen=True)
class SamplingConfig:
    """Steps and guidance. `first_*` apply to a generated latent 0 (monolithic), `video_*` to later
    units. A scale > 0 turns classifier-free guidance on for that unit ([negative, positive] batch,
    v = v_neg + g (v_pos - v_neg)); 0 means one positive-only call. With `linear_guidance`, unit u
    uses max(guidance - guidance_decay * u, min_guidance) instead (Pyramid-Flow option).
    `history_noise` c > 0 feeds the history as c eps + (1 - c) h, fresh eps per stage, like the
    training-time corruption (c ~ U(0, corrupt_ratio)): the model's own frames then look no more
    trustworthy than the noised true frames it learnt from, which damps frame-to-frame drift."""

    first_steps: tuple[int, ...] = setting((20, 20, 20), "Euler steps per pyramid stage for a generated latent 0 (monolithic)")
    video_steps: tuple[int, ...] = setting((10, 10, 10), "Euler steps per pyramid stage for latent frames 1, 2, ...")
    guidance: float = setting(7.0, "classifier-free guidance scale for latent 0 (0 = no CFG)")
    video_guidance: float = setting(5.0, "classifier-free guidance scale for later latent frames (0 = no CFG)")
    linear_guidance: bool = setting(False, "decay the guidance per latent frame: max(guidance - decay * k, min)")
    min_guidance: float = setting(2.0, "lower bound of linear guidance")
    guidance_decay: float = setting(0.5, "per-latent-frame decrease of linear guidance")
    history_noise: float = setting(
        0.0, "noise level c in [0, 1) mixed into the history frames (c eps + (1 - c) h) against drift"
    )

    def unit_plan(self, unit: int) -> tuple[tuple[int, ...], float]:
        steps = self.first_steps if unit == 0 else self.video_steps
        if self.linear_guidance:
            return steps, max(self.guidance - self.guidance_decay * unit, self.min_guidance)
        return steps, self.guidance if unit == 0 else self.video_guidance

    def validate(self) -> list[str]:
        return sampling_problems(dataclasses.asdict(self))


KNOBS = tuple(f.name for f in dataclasses.fields(SamplingConfig))


def sampling_problems(values: Mapping[str, Any]) -> list[str]:
    """Problems with the `SamplingConfig` knobs in `values` (None = not set, not a problem)."""
    from neodragon_cli.pipelines.flow.scheduler import parse_steps

    problems = []
    for name in ("first_steps", "video_steps"):
        if values.get(name) is not None:
            try:
                parse_steps(values[name])
            except ValueError as exc:
                problems.append(f"{name}: {exc}")
    for name in ("guidance", "video_guidance", "min_guidance", "guidance_decay"):
        if values.get(name) is not None and values[name] < 0:
            problems.append(f"{name} must be >= 0, got {values[name]}")
    noise = values.get("history_noise")
    if noise is not None and not 0 <= noise < 1:
        problems.append(f"history_noise must be in [0, 1), got {noise}")
    return problems


def _knob(name: str):
    """A `GenerationSettings` field for the `SamplingConfig` knob `name`: unset, same documentation."""
    return setting(None, SamplingConfig.__dataclass_fields__[name].metadata["doc"])


@dataclass
class GenerationSettings:
    """How to sample one video. Every field may be None = "not set here": settings are layered
    (model defaults < recipe < command line) with `over`, and `resolved` checks all are set."""

    mode: Literal["hybrid", "monolithic"] | None = setting(None, "hybrid: latent 0 from a first-frame image (generator or --image) through the VAE encoder; "
        "monolithic: the DiT generates latent 0 too"
    )  # fmt: skip
    first_steps: list[int] | None = _knob("first_steps")
    video_steps: list[int] | None = _knob("video_steps")
    guidance: float | None = _knob("guidance")
    video_guidance: float | None = _knob("video_guidance")
    linear_guidance: bool | None = _knob("linear_guidance")
    min_guidance: float | None = _knob("min_guidance")
    guidance_decay: float | None = _knob("guidance_decay")
    history_noise: float | None = _knob("history_noise")
    frames: int | None = setting(None, "video frames, 1 + 8k (49 = 7 latent frames)")
    height: int | None = setting(None, "video height in pixels, a multiple of 64 (before super-resolution)")
    width: int | None = setting(None, "video width in pixels, a multiple of 64 (before super-resolution)")
    fps: float | None = setting(None, "frames per second of the written video")
    sr: bool | None = setting(None, "2x super-resolution of every frame (needs an sr component)")
    prompt_modifier: str | None = setting(None, "text appended to every prompt before encoding")
    negative_prompt: str | None = setting(None, "negative prompt for classifier-free guidance")

    @classmethod
    def from_config(cls, config: SamplingConfig, **others: Any) -> "GenerationSettings":
        """Settings holding every knob of `config`, plus `others` (mode, frames, ...)."""
        knobs = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
        return cls(**knobs, **others)

    def over(self, base: "GenerationSettings") -> "GenerationSettings":
        """These settings on top of `base` (fields set here win)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(base, **{k: v for k, v in values.items() if v is not None})

    def validate(self) -> list[str]:
        """Problems with the fields that are set (used by recipe validation and `resolved`)."""
        problems = []
        if self.frames is not None and (self.frames < 1 or (self.frames - 1) % 8):
            problems.append(f"frames must be 1 + 8k (e.g. 9, 17, 49), got {self.frames}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value <= 0 or value % SIZE_MULTIPLE):
                problems.append(f"{name} must be a positive multiple of {SIZE_MULTIPLE}, got {value}")
        problems += sampling_problems({k: getattr(self, k) for k in KNOBS})
        if self.fps is not None and self.fps <= 0:
            problems.append(f"fps must be positive, got {self.fps}")
        return problems

    def resolved(self) -> "GenerationSettings":
        """Fill unset knobs with `SamplingConfig`'s defaults and check everything; raises UsageError (one line)."""
        from neodragon_cli.errors import UsageError

        defaults = GenerationSettings.from_config(
            SamplingConfig(), sr=False, prompt_modifier="", negative_prompt=PYRAMID_FLOW_NEGATIVE
        )
        filled = self.over(defaults)
        unset = [f.name for f in dataclasses.fields(filled) if getattr(filled, f.name) is None]
        problems = filled.validate() + ([f"not set: {', '.join(unset)}"] if unset else [])
        if problems:
            raise UsageError("; ".join(problems), hint="fix the option, the recipe or the model's pipeline.json")
        return filled

    def sampling_config(self) -> SamplingConfig:
        """The sampler's knobs of (resolved) settings."""
        from neodragon_cli.pipelines.flow.scheduler import parse_steps

        knobs = {k: getattr(self, k) for k in KNOBS}
        return SamplingConfig(
            **{**knobs, "first_steps": parse_steps(self.first_steps), "video_steps": parse_steps(self.video_steps)}
        )

    def as_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@recipe_schema("generate")
@dataclass
class GenerateRecipe:
    """A generation run: which model, and settings on top of the model's own defaults."""

    model: str | None = setting(None, "model folder or embedded model name (none: --model, else the default embedded model)")
    seed: int = setting(0, "random seed (same seed, same video)")
    format: Literal["mp4", "png", "gif"] = setting("mp4", "output format")
    dtype: Literal["bf16", "fp16", "fp32"] | None = setting(None, "precision of the components (none: bf16 on CUDA, fp32 on CPU)")
    sampling: GenerationSettings = field(
        default_factory=GenerationSettings, metadata={"doc": "sampling settings; unset keys keep the model's defaults (else SamplingConfig's)"}
    )
