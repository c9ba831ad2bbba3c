"""`neodragon export` on the embedded model: bad inputs exit 2 with one line before any work; a
small export verifies, validates every graph, and `generate --runtime onnx` from it reproduces the
PyTorch video."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from neodragon_cli.app import app

runner = CliRunner()
EMBEDDED = "shapes-teacher"
SMALL = ["--height", "64", "--width", "64", "--frames", "17"]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--height", "96", "--width", "64", "--frames", "17"], "multiples of 64"),
        (["--height", "64", "--width", "64", "--frames", "10"], "frames must be 1 + 8k"),
        (["--components", "sr"], "has no sr component"),
        (["--components", "mmdit,unet"], "unknown component 'unet'"),
        (["--height", "64"], "give all of --height"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(tmp_path, arguments, message):
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", EMBEDDED, "-o", str(out), *arguments])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_existing_output_folder_exits_2(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    result = runner.invoke(app, ["export", EMBEDDED, "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "not empty" in result.output


@pytest.mark.slow
def test_failed_validation_exits_1_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", EMBEDDED, "-o", str(out), "--components", "mmdit", *SMALL, "--min-sqnr", "250"])
    assert result.exit_code == 1, result.output
    assert "dB from PyTorch" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_export_verifies_and_onnx_runtime_reproduces_the_pytorch_video(tmp_path):
    from neodragon_cli.artifacts import resolve_model
    from neodragon_cli.pipelines.deploy.runtime import load_onnx_pipeline
    from neodragon_cli.pipelines.flow.pipeline import VideoPipeline
    from neodragon_cli.pipelines.flow.settings import GenerationSettings

    out = tmp_path / "exported"
    result = runner.invoke(app, ["export", EMBEDDED, "-o", str(out), *SMALL])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
    manifest = json.loads((out / "export.json").read_text())
    assert {"t5", "clip_0", "mmdit_stage0", "mmdit_stage1", "mmdit_stage2", "vae_encoder", "decoder_first", "decoder_step"} <= set(manifest["graphs"])
    for entry in manifest["graphs"].values():
        assert entry["validation"]["passed"] and entry["graph"]["max_rank"] <= 5
        assert entry["graph"]["min_constant"] is None or entry["graph"]["min_constant"] >= -1e4
    assert manifest["graphs"]["t5"]["notes"]["max_residual_after"] < manifest["graphs"]["t5"]["notes"]["max_residual_before"]

    short = GenerationSettings(video_steps=[2, 2, 2], first_steps=[2, 2, 2])  # CFG on, as the model's defaults
    torch_pipe = VideoPipeline.from_pretrained(resolve_model(EMBEDDED))
    onnx_pipe = load_onnx_pipeline(out)
    small = GenerationSettings(height=64, width=64, frames=17)
    reference = torch_pipe.generate("a red circle moving left", torch_pipe.settings(short, small), seed=3).frames
    exported = onnx_pipe.generate("a red circle moving left", onnx_pipe.settings(short), seed=3).frames
    difference = np.abs(reference.astype(int) - exported.astype(int))
    assert reference.shape == exported.shape
    assert (difference <= 2).mean() >= 0.999


def neodragon_root(folder, golden):
    """A tiny Neodragon-layout pipeline root: the golden DistilT5, ContextAdapter, pruned MMDiT (no
    context embedder) and asymmetric VAE (TAEHV-style decoder), plus a random CLIP whose pooled width
    (24) is the MMDiT's pooled projection input."""
    import shutil

    import torch

    from neodragon_cli.artifacts import resolve_model
    from neodragon_cli.pipelines.models.text_encoders import CLIPTextEncoder

    neo = golden / "neodragon"
    folder.mkdir()
    for name, source in [
        ("diffusion_transformer_320p", neo / "mmdit" / "diffusion_transformer_320p"),
        ("context_adapter", neo / "context_adapter" / "context_adapter"),
        ("causal_video_vae", neo / "vae_decoder" / "causal_video_vae"),
        ("text_encoder_3", neo / "distil_t5" / "text_encoder_3"),
        ("tokenizer_3", neo / "distil_t5" / "tokenizer_3"),
    ]:
        (folder / name).symlink_to(source)
    teacher_text = resolve_model(EMBEDDED) / "text"
    config = json.loads((teacher_text / "text_encoder" / "config.json").read_text())
    torch.manual_seed(0)
    CLIPTextEncoder({**config, "projection_dim": 24}).save_pretrained(folder / "text_encoder")
    shutil.copytree(teacher_text / "tokenizer", folder / "tokenizer")
    return folder


@pytest.mark.slow
def test_neodragon_layout_pipeline_exports_and_runs_on_onnx_runtime(tmp_path, golden_dir):
    from neodragon_cli.pipelines.deploy.runtime import load_onnx_pipeline
    from neodragon_cli.pipelines.flow.pipeline import VideoPipeline
    from neodragon_cli.pipelines.flow.settings import GenerationSettings

    root, out = neodragon_root(tmp_path / "neodragon", golden_dir), tmp_path / "exported"
    result = runner.invoke(app, ["export", str(root), "-o", str(out), *SMALL])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "export.json").read_text())
    assert "mmdit_context" not in manifest["graphs"] and {"context_adapter", "decoder_first", "decoder_step"} <= set(manifest["graphs"])
    assert len(manifest["graphs"]["decoder_step"]["inputs"]) == 1 + 9  # latent + one memory per MemBlock
    assert all(e["validation"]["passed"] for e in manifest["graphs"].values())

    settings = GenerationSettings(mode="monolithic", video_steps=[2, 2, 2], first_steps=[2, 2, 2], guidance=7.0,
                                  video_guidance=5.0, height=64, width=64, frames=17)  # fmt: skip
    torch_pipe, onnx_pipe = VideoPipeline.from_pretrained(root), load_onnx_pipeline(out)
    reference = torch_pipe.generate("a red circle moving left", torch_pipe.settings(settings), seed=3).frames
    exported = onnx_pipe.generate("a red circle moving left", onnx_pipe.settings(settings), seed=3).frames
    assert reference.shape == exported.shape == (17, 64, 64, 3)
    assert (np.abs(reference.astype(int) - exported.astype(int)) <= 2).mean() >= 0.999
