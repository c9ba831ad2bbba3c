"""Text-to-video pipeline: prompt -> text encoders -> (ContextAdapter) -> pyramidal MMDiT sampler ->
VAE decoder -> (QuickSRNet 2x) -> uint8 frames, streamed frame by frame.

`VideoPipeline.from_pretrained(folder)` accepts three layouts:

  (a) Neodragon (the Hugging Face repo layout): `diffusion_transformer_320p[_multistep_t2v]/`,
      `context_adapter[_multistep_t2v]/`, `causal_video_vae/`, `text_encoder{,_2,_3}/`,
      `tokenizer{,_2,_3}/` and, for hybrid mode, the SSD-1B first-frame generator folders;
  (b) Pyramid-Flow: `diffusion_transformer_{384p,768p}/`, `causal_video_vae/`, the text folders;
  (c) ours: a folder with `pipeline.json`:

        {"format": "neodragon-pipeline/1",
         "components": {"text_encoder": {"component": "text/bundle", "path": "text"},
                        "mmdit": {"component": "mmdit/pyramid-flow", "path": "mmdit"},
                        "vae": {"component": "vae/pyramid-flow", "path": "vae"},
                        ... optional "context_adapter", "decoder", "first_frame", "sr",
                        "safety_checker" (component "safety/sd-safety-checker")},
         "latent_norm": "pyramid-flow",          # a latents.py scheme name, or its four factors
         "sampling": {...GenerationSettings fields...}}

Roles: `text_encoder` maps prompts to (embeds, mask, pooled); `context_adapter` maps embeds to the DiT's
token width; `vae` encodes a first frame and decodes (unless a separate `decoder` is given);
`first_frame` makes the hybrid first image; `sr` upscales frames 2x; `safety_checker` judges the
written frames (layouts a and b: an optional `safety_checker/` folder). Defaults of a run come from the
model (pipeline.json `sampling`, or the shipped `neodragon/*` / `pyramid_flow/*` recipes), then a
recipe, then explicit arguments.

Precision: `dtype` (float32, bfloat16 or float16) applies to every component except the safety checker
(float32) and the submodules in `FLOAT32_MODULES`, which compute in float32 on up-cast inputs and hand
back the pipeline dtype. The sampler's latents and Euler steps stay float32 whatever the dtype.
Norms need no such care: LayerNorm / GroupNorm accumulate reduced-precision inputs in float32, and the
MMDiT's qk RMSNorm up-casts itself.

Decoding streams: each latent frame is de-normalised and pushed through the VAE's causal
`stream_decode` as soon as the sampler yields it, so memory does not grow with the video length.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import resource
import time
from contextlib import contextmanager
from fnmatch import fnmatchcase
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from neodragon_cli.errors import CheckpointError, UsageError
from neodragon_cli.pipelines.eval import safety  # registers safety/sd-safety-checker
from neodragon_cli.pipelines.flow.sampler import (
    NoiseSource,
    PyramidSampler,
    RowNoise,
    SeededNoise,
    StepEvent,
    TextConditioning,
    mmdit_denoiser,
    prediction_type,
)
from neodragon_cli.pipelines.flow.settings import GenerationSettings
from neodragon_cli.pipelines.models.latents import LatentNorm, denormalize, get_scheme, normalize

PIPELINE_FILE = "pipeline.json"
PIPELINE_FORMAT = "neodragon-pipeline/1"
ROLES = ("text_encoder", "context_adapter", "mmdit", "vae", "decoder", "first_frame", "sr", "safety_checker")
SAFETY_FOLDER = "safety_checker"  # the optional checker folder of the Neodragon and Pyramid-Flow layouts
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Submodules (fnmatch patterns on names inside a role's module) kept in float32 under bf16 / fp16:
FLOAT32_MODULES = {
    # the timestep MLP feeds the AdaLN scale / shift / gate of every block (the MMDiT's keep_precision
    # for quantization also lists proj_out; here it would hand its output back in the pipeline dtype)
    "mmdit": ("time_text_embed",),
    # T5's feed-forward output overflows fp16 (transformers keeps `wo` in float32 for the same reason)
    "text_encoder": ("*DenseReluDense.wo",),
}


# ---------------------------------------------------------------------- profiling


@dataclass
class ComponentTiming:
    calls: int = 0
    seconds: float = 0.0
    peak_mb: float = 0.0  # process peak RSS (CPU) or peak allocated (CUDA) while the component ran


class Profiler:
    """Per-component wall time, call count and peak memory (Table-7 style).

    `with profiler.section("mmdit"): ...` around every call. Times are exclusive: when sections nest
    (the streaming decoder pulls latents, which runs the sampler), the outer one is paused while the
    inner one runs, so the components add up to at most the wall time. On CUDA the peak is the
    allocator's peak during the component; on CPU it is the process's peak RSS when the component
    finished (a high-water mark: the first component that needs the memory shows it)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.components: dict[str, ComponentTiming] = {}
        self._running: list[list] = []  # [name, start of its current slice]

    @contextmanager
    def section(self, name: str):
        entry = self.components.setdefault(name, ComponentTiming())
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._switch()
        self._running.append([name, time.perf_counter()])
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() / 2**20
            else:
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
            self._switch()
            self._running.pop()
            if self._running:
                self._running[-1][1] = time.perf_counter()
            entry.calls += 1
            entry.peak_mb = max(entry.peak_mb, peak)

    def _switch(self) -> None:
        """Credit the running section with the time since its slice started."""
        if self._running:
            name, start = self._running[-1]
            now = time.perf_counter()
            self.components[name].seconds += now - start
            self._running[-1][1] = now

    def total_seconds(self) -> float:
        return sum(c.seconds for c in self.components.values())

    def as_dict(self) -> dict:
        return {name: dataclasses.asdict(c) for name, c in self.components.items()}


# ---------------------------------------------------------------------- precision


def _cast_floats(value, dtype: torch.dtype):
    """`value` (a tensor, or tuples / lists / dicts of them) with floating tensors cast to `dtype`."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value


def cast_for_generation(module: torch.nn.Module, dtype: torch.dtype, keep: tuple[str, ...] = ()) -> list[str]:
    """Cast `module` to `dtype` in place, except the submodules named by the fnmatch patterns `keep`:
    they stay float32, get float32 inputs and return `dtype`. Returns the names kept."""
    module.to(dtype=dtype)
    if dtype == torch.float32:
        return []
    matched = [name for name, _ in module.named_modules() if any(fnmatchcase(name, p) for p in keep)]
    kept = [name for name in matched if not any(name.startswith(outer + ".") for outer in matched)]
    for name in kept:
        sub = module.get_submodule(name).float()
        sub.register_forward_pre_hook(lambda _, args, kwargs: _cast_floats((args, kwargs), torch.float32), with_kwargs=True)
        sub.register_forward_hook(lambda _, args, output: _cast_floats(output, dtype))
    return kept


def parse_dtype(name: str) -> torch.dtype:
    """bf16 / fp16 / fp32 -> torch dtype (UsageError naming the choices otherwise)."""
    if name not in DTYPES:
        raise UsageError(f"unknown dtype '{name}'", hint=f"use one of: {', '.join(DTYPES)}")
    return DTYPES[name]


# ---------------------------------------------------------------------- layouts


def _settings_from_recipe(name: str) -> GenerationSettings:
    from neodragon_cli import recipes

    return recipes.load(name, command="generate").sampling


def _has(folder: Path, *names: str) -> bool:
    return all((folder / n).exists() for n in names)


def detect_layout(folder: Path) -> str:
    """'ours', 'neodragon' or 'pyramid-flow' (CheckpointError when it is none of them)."""
    if (folder / PIPELINE_FILE).is_file():
        return "ours"
    if _has(folder, "diffusion_transformer_320p") or _has(folder, "diffusion_transformer_320p_multistep_t2v"):
        return "neodragon"
    if _has(folder, "diffusion_transformer_384p") or _has(folder, "diffusion_transformer_768p"):
        return "pyramid-flow"
    raise CheckpointError(
        f"{folder} is not a video pipeline folder",
        hint=f"expected {PIPELINE_FILE}, a Neodragon (diffusion_transformer_320p/) or a Pyramid-Flow (diffusion_transformer_384p/) root",
    )


def _load_detected(path: Path, kind: str, **kwargs):
    from neodragon_cli import registry

    return registry.load_component(kind, path, **kwargs)


def _load_named(spec: str, path: Path, **kwargs):
    from neodragon_cli import registry

    if not path.exists():
        raise CheckpointError(f"component folder {path} named in {PIPELINE_FILE} does not exist")
    module = registry.get(spec).load(path, **kwargs)
    return module.eval() if hasattr(module, "eval") else module


# ---------------------------------------------------------------------- pipeline


@dataclass
class GenerationResult:
    frames: np.ndarray | None  # uint8 [T, H, W, 3] when no sink took them
    latents: torch.Tensor  # normalised [1, C, T_lat, h, w]
    settings: GenerationSettings
    seed: int | None
    profile: Profiler
    num_frames: int = 0


class VideoPipeline:
    """Components plus their default settings; `generate` makes one video, `generate_batch` several
    at once (see module docstring)."""

    max_batch: int | None = None  # videos per generate_batch call (None: any)

    def __init__(
        self,
        *,
        mmdit,
        vae,
        text_encoder=None,
        context_adapter=None,
        decoder=None,
        first_frame=None,
        sr=None,
        safety_checker=None,
        latent_norm: str | LatentNorm | None = None,
        defaults: GenerationSettings | None = None,
        component_paths: dict[str, Path] | None = None,
        name: str = "",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.mmdit, self.vae, self.text_encoder = mmdit, vae, text_encoder
        self.context_adapter, self.decoder, self.first_frame, self.sr = context_adapter, decoder, first_frame, sr
        self.safety_checker = safety_checker
        norm = latent_norm if latent_norm is not None else vae.latent_norm
        if norm is None:
            raise CheckpointError("the pipeline needs a latent normalisation scheme", hint=f"set latent_norm in {PIPELINE_FILE}")
        self.latent_norm = get_scheme(norm)
        self.defaults = defaults or GenerationSettings()
        self.component_paths = dict(component_paths or {})
        self.name = name
        self.device = torch.device(device)
        self.dtype = dtype

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, mode: str | None = None, variant: str | None = None,
        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, safety_checker: bool = True,
    ) -> "VideoPipeline":
        """Load any of the three layouts. `mode` picks Neodragon's hybrid or monolithic weights
        (layout a; default hybrid); `variant` picks Pyramid-Flow's 384p or 768p (layout b);
        `safety_checker=False` leaves the pipeline's safety checker unloaded; `dtype`: see the module docstring."""
        folder = Path(path)
        if not folder.is_dir():
            raise CheckpointError(f"model folder does not exist: {folder}", hint="give a local pipeline folder")
        layout = detect_layout(folder)
        loader = {"ours": cls._load_ours, "neodragon": cls._load_neodragon, "pyramid-flow": cls._load_pyramid_flow}[layout]
        parts = loader(folder, mode=mode, variant=variant, safety_checker=safety_checker)
        checker = folder / SAFETY_FOLDER
        if layout != "ours" and safety_checker and checker.is_dir():
            parts["safety_checker"] = safety.SafetyChecker.from_pretrained(checker)
            parts["component_paths"]["safety_checker"] = checker
        for key in ROLES:
            part = parts.get(key)
            if part is None:
                continue
            if isinstance(part, torch.nn.Module):
                cast_for_generation(part, dtype, FLOAT32_MODULES.get(key, ()))
            elif key != "safety_checker":  # the diffusers-based first-frame generator; the checker stays float32
                part.to(dtype=dtype)
            parts[key] = part.to(device=device).eval()
        return cls(**parts, device=device, dtype=dtype, name=folder.name)

    @staticmethod
    def _load_ours(folder: Path, *, safety_checker: bool, **_) -> dict:
        try:
            spec = json.loads((folder / PIPELINE_FILE).read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{folder / PIPELINE_FILE} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
        if spec.get("format") != PIPELINE_FORMAT:
            raise CheckpointError(f"{folder / PIPELINE_FILE}: unknown format {spec.get('format')!r} (expected {PIPELINE_FORMAT})")
        components = spec.get("components", {})
        unknown = sorted(set(components) - set(ROLES))
        missing = [r for r in ("text_encoder", "mmdit", "vae") if r not in components]
        if unknown or missing:
            raise CheckpointError(f"{folder / PIPELINE_FILE}: unknown roles {unknown} / missing roles {missing} (roles: {', '.join(ROLES)})")
        parts, paths = {}, {}
        for role, entry in components.items():
            if role == "safety_checker" and not safety_checker:
                continue
            paths[role] = folder / entry["path"]
            parts[role] = _load_named(entry["component"], paths[role])
        norm = spec.get("latent_norm")
        settings = spec.get("sampling", {})
        unknown_settings = sorted(set(settings) - {f.name for f in dataclasses.fields(GenerationSettings)})
        if unknown_settings:
            raise CheckpointError(f"{folder / PIPELINE_FILE}: unknown sampling keys {unknown_settings}")
        return dict(
            parts, latent_norm=LatentNorm(**norm) if isinstance(norm, dict) else norm,
            defaults=GenerationSettings(**settings), component_paths=paths,
        )

    @staticmethod
    def _load_neodragon(folder: Path, *, mode: str | None, **_) -> dict:
        mode = mode or "hybrid"
        suffix = "" if mode == "hybrid" else "_multistep_t2v"
        paths = {
            "text_encoder": folder,
            "mmdit": folder / f"diffusion_transformer_320p{suffix}",
            "context_adapter": folder / f"context_adapter{suffix}",
            "vae": folder / "causal_video_vae",
        }
        for role, p in paths.items():
            if not p.exists():
                raise CheckpointError(f"Neodragon {mode} mode needs {p.name}/ in {folder}")
        kinds = {"text_encoder": "text", "mmdit": "mmdit", "context_adapter": "adapter", "vae": "vae"}
        parts = {role: _load_detected(p, kinds[role]) for role, p in paths.items()}
        if mode == "hybrid" and (folder / "ssd_1b_unet").is_dir():
            parts["first_frame"] = _load_detected(folder, "first-frame")
            paths["first_frame"] = folder
        return dict(parts, defaults=_settings_from_recipe(f"neodragon/{mode}"), component_paths=paths)

    @staticmethod
    def _load_pyramid_flow(folder: Path, *, variant: str | None, **_) -> dict:
        variants = [v for v in ("384p", "768p") if (folder / f"diffusion_transformer_{v}").is_dir()]
        variant = variant or variants[0]
        if variant not in variants:
            raise CheckpointError(f"no diffusion_transformer_{variant}/ in {folder}", hint=f"available: {', '.join(variants)}")
        paths = {"text_encoder": folder, "mmdit": folder / f"diffusion_transformer_{variant}", "vae": folder / "causal_video_vae"}
        parts = {role: _load_detected(p, role.removesuffix("_encoder")) for role, p in paths.items()}
        return dict(parts, defaults=_settings_from_recipe(f"pyramid_flow/{variant}"), component_paths=paths)

    # ------------------------------------------------------------------ stages

    def encode_prompts(self, prompts: list[str], profile: Profiler) -> TextConditioning:
        if self.text_encoder is None:
            raise UsageError("this pipeline has no text encoder", hint="pass text conditioning directly")
        with profile.section("text_encoder"), torch.no_grad():
            embeds, mask, pooled = self.text_encoder(prompts)
        if self.context_adapter is not None:
            with profile.section("context_adapter"), torch.no_grad():
                embeds = self.context_adapter(embeds)
        return TextConditioning(embeds.float(), mask, pooled.float()).to(self.device)

    def first_latent(self, image: np.ndarray, noise: NoiseSource, profile: Profiler) -> torch.Tensor:
        """uint8 image [H, W, 3] (or a stack [B, H, W, 3]) -> normalised latent 0 [B, C, 1, h, w]
        (posterior sampled with `noise` kind "posterior", as the reference does)."""
        pixels = torch.from_numpy(np.ascontiguousarray(image)).float().div(255).mul(2).sub(1)
        pixels = pixels.reshape(-1, *pixels.shape[-3:]).permute(0, 3, 1, 2)[:, :, None].to(self.device, self._dtype(self.vae))
        with profile.section("vae_encoder"), torch.no_grad():
            encoded = self.vae.encode(pixels)
        if hasattr(encoded, "mean") and hasattr(encoded, "std"):
            eps = noise.randn(tuple(encoded.mean.shape), kind="posterior").to(encoded.mean.device)
            encoded = encoded.mean + encoded.std * eps
        return normalize(encoded.float(), self.latent_norm)

    def make_first_frame(self, prompt: str, settings: GenerationSettings, seed: int, profile: Profiler) -> np.ndarray:
        with profile.section("first_frame"), torch.no_grad():
            image = self.first_frame.images(prompt, seed=seed)[0]
        return fit_image(np.asarray(image.convert("RGB")), settings.height, settings.width)

    def decode_stream(
        self, latents: Iterator[torch.Tensor], settings: GenerationSettings, profile: Profiler
    ) -> Iterator[list[np.ndarray]]:
        """Normalised latent frames [B, C, 1, h, w] in (from frame 0) -> per batch row, uint8 frames
        [t, H, W, 3] out, as decoded."""
        decoder = self.decoder or self.vae
        dtype = self._dtype(decoder)

        def raw():
            for index, latent in enumerate(latents):
                yield denormalize(latent, self.latent_norm, start_frame=index).to(dtype)

        chunks = decoder.stream_decode(raw())
        while True:
            with profile.section("decoder"), torch.no_grad():
                video = next(chunks, None)
            if video is None:
                return
            if settings.sr:
                video = self.upscale(video, profile)
            yield [to_uint8(row) for row in video]

    def upscale(self, video: torch.Tensor, profile: Profiler) -> torch.Tensor:
        """[B, 3, t, H, W] in [-1, 1] -> [B, 3, t, 2H, 2W] through the sr component (on [0, 1] frames)."""
        b, c, t, h, w = video.shape
        frames = video.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        with profile.section("sr"), torch.no_grad():
            up = self.sr(((frames.float() + 1) / 2).to(self._dtype(self.sr))).float() * 2 - 1
        return up.reshape(b, t, c, *up.shape[-2:]).permute(0, 2, 1, 3, 4)

    @staticmethod
    def _dtype(module) -> torch.dtype:
        param = next(module.parameters(), None) if isinstance(module, torch.nn.Module) else None
        return param.dtype if param is not None else torch.float32

    # ------------------------------------------------------------------ generation

    def settings(self, *layers: GenerationSettings | None) -> GenerationSettings:
        """The model defaults overlaid with `layers` (later wins), checked."""
        merged = self.defaults
        for layer in layers:
            if layer is not None:
                merged = layer.over(merged)
        return merged.resolved()

    def check(self, settings: GenerationSettings, *, have_image: bool = False) -> None:
        """Fail early (UsageError) when `settings` need a component this pipeline lacks."""
        if settings.mode == "hybrid" and not have_image and self.first_frame is None:
            raise UsageError(
                "hybrid mode needs a first frame and this model has no first-frame generator",
                hint="pass --image FIRST_FRAME or use --mode monolithic",
            )
        if settings.sr and self.sr is None:
            raise UsageError("super-resolution was asked for but this model has no sr component", hint="use --no-sr")

    def generate(
        self,
        prompt: str,
        settings: GenerationSettings,
        *,
        seed: int | None = 0,
        noise: NoiseSource | None = None,
        image: np.ndarray | None = None,
        text: TextConditioning | None = None,
        negative: TextConditioning | None = None,
        sink: Callable[[np.ndarray], None] | None = None,
        callback: Callable[[StepEvent], None] | None = None,
        profile: Profiler | None = None,
    ) -> GenerationResult:
        """Make one video. `settings` must be resolved (see `settings`). Frames go to `sink` chunk by
        chunk as they are decoded (uint8 [t, H, W, 3]); without a sink they are returned.

        `noise` replaces the seeded randomness (e.g. `RecordedNoise` for replays); `text`/`negative`
        replace prompt encoding; `image` (uint8 [H, W, 3], already at the video size) is the hybrid
        first frame instead of the first-frame generator's."""
        (result,) = self.generate_batch(
            [prompt], settings, seeds=[seed], noise=noise, image=image, text=text, negative=negative,
            sinks=None if sink is None else [sink], callback=callback, profile=profile,
        )  # fmt: skip
        return result

    def generate_batch(
        self,
        prompts: list[str],
        settings: GenerationSettings,
        *,
        seeds: list[int | None],
        noise: NoiseSource | None = None,
        image: np.ndarray | None = None,
        text: TextConditioning | None = None,
        negative: TextConditioning | None = None,
        sinks: list[Callable[[np.ndarray], None]] | None = None,
        callback: Callable[[StepEvent], None] | None = None,
        profile: Profiler | None = None,
    ) -> list[GenerationResult]:
        """Several videos at once, one batch row each, as `generate` makes them: row i draws its noise
        from its own seed (`RowNoise`), so it is the video `generate(prompts[i], seed=seeds[i])` makes,
        up to float rounding, in less time per video on CPU. `sinks[i]` takes row i's frames; the
        results share one `profile` (the batch's time). `image` is every row's hybrid first frame."""
        rows = len(prompts)
        if self.max_batch is not None and rows > self.max_batch:
            raise UsageError(f"this pipeline generates at most {self.max_batch} video(s) per call, not {rows}",
                             hint="generate them one at a time (--batch-size 1)")  # fmt: skip
        self.check(settings, have_image=image is not None)
        profile = profile or Profiler(self.device)
        noise = noise or RowNoise([SeededNoise(seed if seed is not None else 0) for seed in seeds])
        config = settings.sampling_config()
        num_latents = self.vae.latent_frames(settings.frames)
        hybrid = settings.mode == "hybrid"
        units = range(1 if hybrid else 0, num_latents)
        needs_cfg = any(config.unit_plan(u)[1] > 0 for u in units)
        if text is None:
            text = self.encode_prompts([prompt + settings.prompt_modifier for prompt in prompts], profile)
            if needs_cfg:
                negative = TextConditioning.cat([self.encode_prompts([settings.negative_prompt], profile)] * rows)  # encoded once
        first = None
        if hybrid:
            images = [image] * rows if image is not None else [
                self.make_first_frame(prompt + settings.prompt_modifier, settings, seed or 0, profile)
                for prompt, seed in zip(prompts, seeds)
            ]  # fmt: skip
            first = self.first_latent(np.stack([fit_image(i, settings.height, settings.width) for i in images]), noise, profile)
        scale = self.vae.spatial_compression
        denoise = mmdit_denoiser(self.mmdit)

        def timed_denoiser(clips, cond, t, *step_end):
            with profile.section("mmdit"), torch.no_grad():
                return denoise(clips, cond, t, *step_end)

        timed_denoiser.takes_step_end = denoise.takes_step_end  # a Mean-Flows MMDiT gets its step's end

        sampler = PyramidSampler(timed_denoiser, prediction=prediction_type(self.mmdit))
        latents: list[torch.Tensor] = []

        def sampled():
            for latent in sampler.latent_frames(
                text, negative=negative, num_frames=num_latents, latent_channels=self.mmdit.out_channels,
                latent_size=(settings.height // scale, settings.width // scale), config=config, noise=noise,
                first_latent=first, callback=callback, device=self.device,
            ):  # fmt: skip
                latents.append(latent)
                yield latent

        kept: list[list[np.ndarray]] = [[] for _ in range(rows)]
        counts = [0] * rows
        for chunks in self.decode_stream(sampled(), settings, profile):
            for row, chunk in enumerate(chunks):
                counts[row] += len(chunk)
                (sinks[row] if sinks is not None else kept[row].append)(chunk)
        video_latents = torch.cat(latents, dim=2)
        return [
            GenerationResult(np.concatenate(kept[row]) if kept[row] else None, video_latents[row : row + 1], settings,
                             seeds[row], profile, counts[row])
            for row in range(rows)
        ]  # fmt: skip


# ---------------------------------------------------------------------- seeds


def sample_seed(seed: int, prompt: str, sample: int) -> int:
    """The seed of video `sample` of `prompt` in a batch run with `seed`: a hash of the three, so it
    does not depend on the prompt's place in the file, on --max-prompts or on how ranks share the work."""
    digest = hashlib.sha256(f"{seed}\x00{sample}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1  # 0 .. 2**31 - 1


# ---------------------------------------------------------------------- pixels


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3] by x * 127.5 + 127.5, clamped and truncated
    (as the reference pipelines convert, so frames compare level for level)."""
    scaled = (video.float() * 127.5 + 127.5).clamp(0, 255)
    return scaled.to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def fit_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [h, w, 3] -> [height, width, 3]: scaled (Lanczos) to cover, then centre-cropped."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise UsageError(f"a first frame must be an RGB uint8 image [H, W, 3], got {image.dtype} {tuple(image.shape)}")
    if image.shape[:2] == (height, width):
        return image
    from PIL import Image

    h, w = image.shape[:2]
    scale = max(height / h, width / w)
    size = (max(width, round(w * scale)), max(height, round(h * scale)))
    resized = np.asarray(Image.fromarray(image).resize(size, Image.LANCZOS))
    top, left = (resized.shape[0] - height) // 2, (resized.shape[1] - width) // 2
    return np.ascontiguousarray(resized[top : top + height, left : left + width])


def load_image(path: str | Path) -> np.ndarray:
    """An image file as uint8 RGB [H, W, 3] (UsageError if it cannot be read)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        raise UsageError(f"cannot read the first-frame image {path}: {exc}", hint="give a PNG or JPEG file") from None
