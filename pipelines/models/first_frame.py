"""SSD-1B first-frame generator for Neodragon's hybrid mode.

The first video frame comes from an (LCM-distilled) SSD-1B text-to-image model run through diffusers'
`StableDiffusionXLPipeline` with the published hybrid defaults: LCM scheduler
(`set_alpha_to_one=False, original_inference_steps=4, steps_offset=1`, scaled-linear betas
0.00085-0.012), 4 steps at timesteps [999, 749, 499, 249], guidance 0 (no CFG), 1024x640 (w x h), no
negative prompt. The 8-bit image is then resized with LANCZOS to the video size and mapped to [-1, 1]
([B, 3, H, W], float) for the causal-VAE encoder, exactly as the published hybrid loop does.

Checkpoint layouts (local files only):

* a Neodragon root: `ssd_1b_unet/` (UNet2DConditionModel), `ssd_1b_vae/` (AutoencoderKL),
  `ssd_1b_text_encoder/` (CLIPTextModel), `ssd_1b_text_encoder_2/` (CLIPTextModelWithProjection),
  `ssd_1b_tokenizer/`, `ssd_1b_tokenizer_2/` (CLIPTokenizer);
* a diffusers SDXL folder (`model_index.json` + `unet/`, `vae/`, `text_encoder{,_2}/`, `tokenizer{,_2}/`),
  e.g. segmind/SSD-1B with an LCM UNet.

Every network's weights are checked key by key before loading (the non-variant file is preferred, as
in the published loader; an `.fp16` twin is used only when it is the only file). The scheduler folder is
never read: the scheduler is built in code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from neodragon_cli.errors import CheckpointError
from neodragon_cli.pipelines.models.checkpoint import load_tied_checked, read_config, save_folder, untied_state_dict
from neodragon_cli.pipelines.models.text_encoders import load_tokenizer, read_folder_weights
from neodragon_cli.registry import register

DEFAULT_INFERENCE_PARAMS = {
    "num_inference_steps": 4,
    "timesteps": [999, 749, 499, 249],
    "height": 640,
    "width": 1024,
    "guidance_scale": 0.0,
}
_NETWORKS = ("unet", "vae", "text_encoder", "text_encoder_2")
_TOKENIZERS = ("tokenizer", "tokenizer_2")


def lcm_scheduler():
    """The scheduler the published hybrid mode builds in code (LCM, remaining defaults)."""
    from diffusers import LCMScheduler

    return LCMScheduler(set_alpha_to_one=False, original_inference_steps=4, steps_offset=1)


def _prefix(root: Path) -> str:
    """"ssd_1b_" for a Neodragon root, "" for a diffusers SDXL folder."""
    return "ssd_1b_" if (root / "ssd_1b_unet").is_dir() else ""


def _looks_like_ssd1b(path: Path) -> bool:
    if not path.is_dir():
        return False
    if (path / "ssd_1b_unet").is_dir():
        return True
    index = path / "model_index.json"
    return index.is_file() and "StableDiffusionXLPipeline" in index.read_text()


def _builders() -> dict[str, tuple[Callable[[dict], nn.Module], str]]:
    """component -> (build an untrained module from its config.json, weight file stem)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    return {
        "unet": (UNet2DConditionModel.from_config, "diffusion_pytorch_model"),
        "vae": (AutoencoderKL.from_config, "diffusion_pytorch_model"),
        "text_encoder": (lambda c: CLIPTextModel(CLIPTextConfig(**c)), "model"),
        "text_encoder_2": (lambda c: CLIPTextModelWithProjection(CLIPTextConfig(**c)), "model"),
    }


def _config_of(module: nn.Module) -> dict:
    """config.json content of a transformers or diffusers module."""
    config = module.config
    if hasattr(config, "to_dict"):  # transformers
        return {**config.to_dict(), "architectures": [type(module).__name__]}
    import diffusers

    public = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    return {"_class_name": type(module).__name__, "_diffusers_version": diffusers.__version__, **public}


def _to_minus_one_one(images) -> torch.Tensor:
    """PIL RGB images -> [B, 3, H, W] float in [-1, 1] (uint8 / 255 * 2 - 1)."""
    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255.0 * 2.0 - 1.0


@register(
    "first-frame",
    "ssd1b",
    description="SSD-1B text-to-image first frame (diffusers SDXL pipeline, LCM 4 steps, no CFG)",
    detect=_looks_like_ssd1b,
)
class SSD1BFirstFrameGenerator:
    """Prompt(s) -> first frame.

    `images(prompts)` gives the pipeline's PIL images (1024x640 by default); `generator(prompts,
    (height, width))` gives [B, 3, height, width] float in [-1, 1], LANCZOS-resized from them. Seeded
    calls are deterministic (a CPU torch.Generator drives the initial latents and the LCM noise).
    """

    def __init__(self, unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2):
        from diffusers import StableDiffusionXLPipeline

        self.pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=lcm_scheduler(),
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,  # invisible-watermark is not installed by the published code either
        )
        self.pipe.set_progress_bar_config(disable=True)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | None = None) -> "SSD1BFirstFrameGenerator":
        root = Path(path)
        if not _looks_like_ssd1b(root):
            raise CheckpointError(
                f"{root} holds no SSD-1B pipeline",
                hint="expected a Neodragon root with ssd_1b_* folders or a diffusers SDXL folder",
            )
        prefix = _prefix(root)
        parts = {}
        for name, (build, stem) in _builders().items():
            folder = root / f"{prefix}{name}"
            module = build(read_config(folder))
            parts[name] = load_tied_checked(module, read_folder_weights(folder, stem), source=str(folder))
        for name in _TOKENIZERS:
            parts[name] = load_tokenizer(root / f"{prefix}{name}")
        generator = cls(**parts)
        if dtype is not None:
            generator.to(dtype=dtype)
        return generator.eval()

    def save_pretrained(self, path: str | Path) -> None:
        """Write the Neodragon layout (`ssd_1b_*` folders)."""
        root = Path(path)
        for name, (_, stem) in _builders().items():
            module = getattr(self.pipe, name)
            save_folder(root / f"ssd_1b_{name}", _config_of(module), untied_state_dict(module), f"{stem}.safetensors")
        for name in _TOKENIZERS:
            getattr(self.pipe, name).save_pretrained(str(root / f"ssd_1b_{name}"))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SSD1BFirstFrameGenerator":
        self.pipe.to(device=device, dtype=dtype)
        return self

    def eval(self) -> "SSD1BFirstFrameGenerator":
        for name in _NETWORKS:
            getattr(self.pipe, name).eval()
        return self

    def images(self, prompt: str | Sequence[str], *, seed: int | None = None, **overrides) -> list:
        """PIL images from the SDXL pipeline with the hybrid defaults (`overrides` replace them)."""
        params = {**DEFAULT_INFERENCE_PARAMS, **overrides}
        if "num_inference_steps" in overrides and "timesteps" not in overrides:
            del params["timesteps"]  # let the LCM schedule follow the requested step count
        if seed is not None:
            params["generator"] = torch.Generator("cpu").manual_seed(seed)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        with torch.no_grad():
            return self.pipe(prompt=prompts, output_type="pil", **params).images

    def __call__(
        self, prompt: str | Sequence[str], size: tuple[int, int], *, seed: int | None = None, **overrides
    ) -> torch.Tensor:
        """First frames at the video size `size` = (height, width): [B, 3, height, width] float in [-1, 1].
        `overrides` go to the pipeline (its `height` / `width` are the generation size, 640 x 1024)."""
        from PIL import Image

        height, width = size
        images = self.images(prompt, seed=seed, **overrides)
        return _to_minus_one_one([im.resize((width, height), Image.LANCZOS) for im in images])
