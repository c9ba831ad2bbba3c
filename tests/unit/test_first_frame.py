"""SSD-1B first-frame generator on a tiny random SDXL-architecture pipeline built here, saved in the
Neodragon folder layout (ssd_1b_* subfolders) and loaded back through the registry."""

from __future__ import annotations

import json
import string

import pytest
import torch

from neodragon_cli import load_component
from neodragon_cli.errors import CheckpointError
from neodragon_cli.pipelines.models.first_frame import DEFAULT_INFERENCE_PARAMS, SSD1BFirstFrameGenerator, lcm_scheduler
from neodragon_cli.pipelines.models.text_encoders import load_tokenizer

PROMPT = "a red circle moving left"


def _write_clip_tokenizer(folder):
    """A character-level CLIP BPE tokenizer: ids 0/1 are start/end of text, no merges."""
    folder.mkdir(parents=True)
    symbols = list(string.ascii_lowercase + string.digits + ",.!")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32}))
    return load_tokenizer(folder)


def _tiny_sdxl(tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    clip = dict(vocab_size=96, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                max_position_embeddings=32, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 1),
        cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, time_cond_proj_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
    )
    return SSD1BFirstFrameGenerator(
        unet=unet,
        vae=vae,
        text_encoder=CLIPTextModel(CLIPTextConfig(**clip)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**clip)),
        tokenizer=_write_clip_tokenizer(tmp_path / "tok"),
        tokenizer_2=_write_clip_tokenizer(tmp_path / "tok2"),
    ).eval()


@pytest.fixture(scope="module")
def saved_root(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("ssd1b")
    generator = _tiny_sdxl(tmp)
    root = tmp / "neodragon"
    generator.save_pretrained(root)
    return root, generator


def test_neodragon_layout_round_trip(saved_root):
    root, original = saved_root
    names = {"ssd_1b_unet", "ssd_1b_vae", "ssd_1b_text_encoder", "ssd_1b_text_encoder_2", "ssd_1b_tokenizer", "ssd_1b_tokenizer_2"}
    assert names <= {p.name for p in root.iterdir()}
    loaded = load_component("first-frame", root)
    assert isinstance(loaded, SSD1BFirstFrameGenerator)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(original.pipe, name).state_dict(), getattr(loaded.pipe, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_official_scheduler_and_defaults(saved_root):
    root, _ = saved_root
    scheduler = load_component("first-frame/ssd1b", root).pipe.scheduler
    assert type(scheduler).__name__ == "LCMScheduler"
    config = scheduler.config
    assert (config.set_alpha_to_one, config.original_inference_steps, config.steps_offset) == (False, 4, 1)
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    # The explicit timesteps are exactly LCM's own 4-step schedule.
    reference = lcm_scheduler()
    reference.set_timesteps(4)
    assert reference.timesteps.tolist() == DEFAULT_INFERENCE_PARAMS["timesteps"]
    defaults = DEFAULT_INFERENCE_PARAMS
    assert (defaults["height"], defaults["width"], defaults["guidance_scale"], defaults["num_inference_steps"]) == (640, 1024, 0, 4)


def test_first_frame_shape_range_and_determinism(saved_root):
    root, _ = saved_root
    generator = load_component("first-frame", root)
    run = dict(num_inference_steps=2, height=32, width=48)
    native = generator.images(PROMPT, seed=3, **run)
    assert native[0].size == (48, 32)
    frame = generator([PROMPT, "a blue box"], (24, 40), seed=3, **run)
    assert frame.shape == (2, 3, 24, 40) and frame.dtype == torch.float32
    assert frame.min() >= -1 and frame.max() <= 1
    # uint8 levels mapped to [-1, 1]
    levels = (frame + 1) / 2 * 255
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    again = generator([PROMPT, "a blue box"], (24, 40), seed=3, **run)
    assert torch.equal(frame, again)
    other = generator([PROMPT, "a blue box"], (24, 40), seed=4, **run)
    assert not torch.equal(frame, other)


def test_mismatched_unet_fails_naming_keys(saved_root, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    root, _ = saved_root
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    weights = broken / "ssd_1b_unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state.pop("conv_in.weight")
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match="missing keys: conv_in.weight"):
        load_component("first-frame/ssd1b", broken)


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no SSD-1B pipeline"):
        SSD1BFirstFrameGenerator.from_pretrained(tmp_path)
