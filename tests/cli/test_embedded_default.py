"""The embedded default model: shipped in the package as fp16 within 40 MB, and the README's main job
(`neodragon generate PROMPT -o out.mp4`, no other flag) makes a 49-frame 128x128 24 fps video of it."""

from __future__ import annotations

import json
import struct

import pytest
from typer.testing import CliRunner

from neodragon_cli.app import app
from neodragon_cli.artifacts import embedded_models_root
from neodragon_cli.commands.generate import DEFAULT_MODEL

MAIN_JOB = "a small red circle moving left on a black background"


def _safetensors_dtypes(path) -> set[str]:
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def test_embedded_default_is_fp16_and_small():
    folder = embedded_models_root() / DEFAULT_MODEL
    assert (folder / "pipeline.json").is_file(), f"{DEFAULT_MODEL} is not shipped in the package"
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 40 * 2**20
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert {"mmdit", "text", "vae"} <= {p.relative_to(folder).parts[0] for p in weights}
    for path in weights:
        assert _safetensors_dtypes(path) <= {"F16", "I64"}, path


@pytest.mark.slow
def test_main_job_makes_a_video_the_judge_accepts(tmp_path):
    from neodragon_cli.pipelines.data.video_io import read_video
    from neodragon_cli.pipelines.eval.judge import judge

    out = tmp_path / "out.mp4"
    result = CliRunner().invoke(app, ["generate", MAIN_JOB, "-o", str(out)])
    assert result.exit_code == 0, result.output
    frames, fps = read_video(out)
    assert frames.shape == (49, 128, 128, 3) and fps == 24
    assert json.loads(out.with_suffix(".json").read_text())["prompt"] == MAIN_JOB
    # The shipped teacher is weak (README: Semantic well below target); what it reliably gets right is
    # the background, which an untrained model does not produce.
    verdict = judge(frames, MAIN_JOB)
    assert verdict.attributes["background"], verdict.to_dict()
