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
