"""`neodragon generate` on a tiny random model in our pipeline.json layout: reproducible bytes,
metadata, streaming pipeline pieces, and one-line usage errors that leave no output behind."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from neodragon_cli.app import app
from neodragon_cli.atomic import write_json

runner = CliRunner()

CORPUS = [
    "a red circle moving left", "a blue square moving right", "a green triangle resting",
    "a small yellow ball sliding up", "a large cyan box drifting down on a gray background",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """text bundle (tiny T5, no CLIP) + 1-block MMDiT + small causal VAE, random weights."""
    from neodragon_cli.pipelines.models.causal_vae import CausalVideoVAE
    from neodragon_cli.pipelines.models.mmdit import PyramidFlowMMDiT
    from neodragon_cli.pipelines.models.text_encoders import T5TextEncoder, TextEncoderBundle, t5_config, train_t5_tokenizer

    root = tmp_path_factory.mktemp("tiny-model")
    torch.manual_seed(0)
    tokenizer = train_t5_tokenizer(CORPUS * 20, root / "build-tokenizer", vocab_size=40)
    t5 = T5TextEncoder(t5_config(vocab_size=len(tokenizer), d_model=16, num_layers=1, num_heads=2, d_ff=32, d_kv=8))
    TextEncoderBundle(tokenizer, t5, max_length=16).save_pretrained(root / "text")
    mmdit = PyramidFlowMMDiT(
        sample_size=8, num_layers=1, attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
        pooled_projection_dim=0, pos_embed_max_size=16, joint_attention_dim=16,
    )  # fmt: skip
    with torch.no_grad():  # a fresh MMDiT outputs exactly 0 (AdaLN-Zero); make it do something
        for p in mmdit.parameters():
            p.normal_(0, 0.2)
    mmdit.save_pretrained(root / "mmdit")
    CausalVideoVAE(
        encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        encoder_layers_per_block=(1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
        encoder_norm_num_groups=4, decoder_norm_num_groups=4,
    ).save_pretrained(root / "vae")  # fmt: skip
    write_json(
        root / "pipeline.json",
        {
            "format": "neodragon-pipeline/1",
            "components": {
                "text_encoder": {"component": "text/bundle", "path": "text"},
                "mmdit": {"component": "mmdit/pyramid-flow", "path": "mmdit"},
                "vae": {"component": "vae/pyramid-flow", "path": "vae"},
            },
            "latent_norm": "pyramid-flow",
            "sampling": {
                "mode": "monolithic", "first_steps": [2, 2, 2], "video_steps": [1, 1, 1], "guidance": 3.0,
                "video_guidance": 2.0, "frames": 17, "height": 64, "width": 64, "fps": 8,
                "negative_prompt": "blurry",
            },  # fmt: skip
        },
    )
    return root


def _run(*args):
    return runner.invoke(app, ["generate", *map(str, args)])


def test_same_seed_gives_identical_mp4_and_metadata(tiny_model, tmp_path):
    a, b, c = tmp_path / "a.mp4", tmp_path / "b.mp4", tmp_path / "c.mp4"
    for path, seed in ((a, 3), (b, 3), (c, 4)):
        result = _run("a red circle moving left", "-o", path, "--model", tiny_model, "--seed", seed)
        assert result.exit_code == 0, result.output
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    meta = json.loads((tmp_path / "a.json").read_text())
    assert meta["prompt"] == "a red circle moving left" and meta["seed"] == 3 and meta["frames"] == 17
    assert meta["settings"]["first_steps"] == [2, 2, 2] and meta["settings"]["mode"] == "monolithic"
    assert set(meta["model"]["components"]) == {"text_encoder", "mmdit", "vae"}
    assert all(len(h) == 64 for h in meta["model"]["components"].values())
    assert {"text_encoder", "mmdit", "decoder"} <= set(meta["timing"]["components"])
    # 3 latent frames: 2 * 3 steps for latent 0 and 1 step per stage after, each a CFG batch
    assert meta["timing"]["components"]["mmdit"]["calls"] == 6 + 3 + 3


def test_prompts_file_options_json_and_profile(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\n\na blue square moving right\n")
    out, summary = tmp_path / "videos", tmp_path / "run.json"
    result = _run(
        "--prompts-file", prompts, "-o", out, "--model", tiny_model, "--format", "png", "--steps", "1-1-1",
        "--frames", 9, "--guidance", 0, "--video-guidance", 0, "--history-noise", 0.2, "--fps", 12, "--json", summary, "--profile",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "per-component time" in result.output
    videos = json.loads(summary.read_text())["videos"]
    assert [v["prompt"] for v in videos] == ["a red circle moving left", "a blue square moving right"]
    for video in videos:
        folder = tmp_path / "videos" / video["video"].split("/")[-1]
        assert len(list(folder.glob("*.png"))) == 9 and video["fps"] == 12
        assert video["settings"]["video_steps"] == [1, 1, 1] and video["timing"]["components"]["mmdit"]["calls"] == 6
        assert video["settings"]["history_noise"] == 0.2


def test_recipe_and_set_override(tiny_model, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"command: generate\nmodel: {tiny_model}\nseed: 7\nsampling:\n  frames: 9\n")
    result = _run("a green triangle resting", "-o", tmp_path / "v.gif", "--recipe", recipe, "--set", "sampling.video_guidance=0")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "v.json").read_text())
    assert meta["seed"] == 7 and meta["frames"] == 9 and meta["settings"]["video_guidance"] == 0.0


def test_hybrid_with_image(tiny_model, tmp_path):
    from PIL import Image

    image = tmp_path / "first.png"
    Image.fromarray(np.full((48, 96, 3), 200, dtype=np.uint8)).save(image)  # resized and centre-cropped
    result = _run("a red circle", "-o", tmp_path / "h.mp4", "--model", tiny_model, "--mode", "hybrid", "--image", image)
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "h.json").read_text())
    assert meta["settings"]["mode"] == "hybrid" and meta["timing"]["components"]["mmdit"]["calls"] == 3 + 3


@pytest.mark.parametrize(
    "args,needle",
    [
        (["", "--model", "MODEL"], "prompt is empty"),
        (["x", "--model", "MODEL", "--frames", "10"], "frames must be 1 + 8k"),
        (["x", "--model", "MODEL", "--height", "100"], "height must be a positive multiple of 64"),
        (["x", "--model", "MODEL", "--width", "96"], "width must be a positive multiple of 64"),
        (["x", "--model", "MODEL", "--mode", "fast"], "unknown mode 'fast'"),
        (["x", "--model", "MODEL", "--steps", "1-x-1"], "--steps"),
        (["x", "--model", "MODEL", "--steps", "1-1"], "--steps"),
        (["x", "--model", "MODEL", "--format", "avi"], "unknown format"),
        (["x", "--model", "MODEL", "--history-noise", "1"], "history_noise must be in [0, 1)"),
        (["x", "--model", "/no/such/model/dir"], "model path does not exist"),
        (["x", "--model", "no-such-model"], "no embedded model"),
        (["x", "--model", "MODEL", "--mode", "hybrid"], "first-frame generator"),
        (["x", "--model", "MODEL", "--sr"], "super-resolution"),
    ],
)
def test_bad_inputs_exit_2_with_one_line_and_no_output(tiny_model, tmp_path, args, needle):
    out = tmp_path / "out.mp4"
    result = _run(*[str(tiny_model) if a == "MODEL" else a for a in args], "-o", out)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_super_resolution_doubles_the_frames(tiny_model, tmp_path):
    import shutil

    from neodragon_cli.pipelines.data.video_io import read_video
    from neodragon_cli.pipelines.models.quicksrnet import QuickSRNetSmall

    model = tmp_path / "with-sr"
    shutil.copytree(tiny_model, model)
    QuickSRNetSmall().save_pretrained(model / "sr")
    spec = json.loads((model / "pipeline.json").read_text())
    spec["components"]["sr"] = {"component": "sr/quicksrnet-small", "path": "sr"}
    write_json(model / "pipeline.json", spec)
    out = tmp_path / "sr-frames"
    result = _run("a red circle", "-o", out, "--model", model, "--sr", "--frames", 9)
    assert result.exit_code == 0, result.output
    frames, _ = read_video(out)
    assert frames.shape == (9, 128, 128, 3)
    assert json.loads((tmp_path / "sr-frames.json").read_text())["timing"]["components"]["sr"]["calls"] >= 2


def test_history_noise_changes_only_the_frames_after_latent_0(tiny_model, tmp_path):
    from neodragon_cli.pipelines.data.video_io import read_video

    videos = {}
    for noise in ("0", "0.5"):
        out = tmp_path / f"hn{noise}" / "frames"
        result = _run("a red circle", "-o", out, "--format", "png", "--model", tiny_model, "--frames", 9, "--history-noise", noise)
        assert result.exit_code == 0, result.output
        videos[noise] = read_video(out)[0].astype(int)
    plain, noised = videos["0"], videos["0.5"]
    assert np.array_equal(plain[0], noised[0])  # latent 0 has no history; the causal decoder keeps frame 0 apart
    assert np.abs(plain[1:] - noised[1:]).max() > 0
