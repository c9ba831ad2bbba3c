"""`neodragon generate` with a safety checker (a tiny random diffusers StableDiffusionSafetyChecker the
test builds): frames checked and recorded; a flagged video is not written (exit 1 alone, recorded and
skipped in a batch); the pipeline folder's `safety_checker` role; --no-safety-check."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_generate import tiny_model  # noqa: F401 -- the module-scoped tiny pipeline fixture
from typer.testing import CliRunner

from neodragon_cli.app import app
from neodragon_cli.atomic import write_json

runner = CliRunner()
FAST = ["--frames", "9", "--first-steps", "1-1-1", "--steps", "1-1-1"]


def _run(*args):
    return runner.invoke(app, ["generate", *map(str, args)])


def _save_checker(folder, *, flags_everything: bool) -> None:
    """A small random checker; concept thresholds of -2 flag every image (cosine scores are >= -1)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    tiny = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(vision_config={**tiny, "image_size": 32, "patch_size": 8}, text_config=tiny, projection_dim=8)
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-2.0 if flags_everything else 2.0)
        checker.special_care_embeds_weights.fill_(2.0)
    checker.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)


@pytest.fixture(scope="module")
def checkers(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkers")
    _save_checker(root / "passes", flags_everything=False)
    _save_checker(root / "flags", flags_everything=True)
    return root


def test_checked_frames_are_recorded(tiny_model, checkers, tmp_path):  # noqa: F811
    result = _run("a red circle", "-o", tmp_path / "v.mp4", "--model", tiny_model, "--safety-checker", checkers / "passes",
                  "--safety-check-frames", 3, *FAST)  # fmt: skip
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "v.json").read_text())
    assert meta["status"] == "written" and (tmp_path / "v.mp4").is_file()
    assert meta["safety_check"] == {"checked_frames": [0, 4, 8], "flagged": False, "flagged_frames": []}
    assert meta["timing"]["components"]["safety_checker"]["calls"] == 1


def test_a_flagged_video_is_not_written(tiny_model, checkers, tmp_path):  # noqa: F811
    result = _run("a red circle", "-o", tmp_path / "v.mp4", "--model", tiny_model, "--safety-checker", checkers / "flags", *FAST)
    assert result.exit_code == 1, result.output
    assert "was not written: the safety checker flagged frame(s) 0" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.json"]
    meta = json.loads((tmp_path / "v.json").read_text())
    assert meta["status"] == "flagged" and meta["safety_check"]["reason"].startswith("the safety checker flagged")

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out, report = tmp_path / "batch", tmp_path / "run.json"
    args = ["--prompts-file", prompts, "-o", out, "--model", tiny_model, "--safety-checker", checkers / "flags", "--json", report, *FAST]
    result = _run(*args)
    assert result.exit_code == 0, result.output
    assert "2 videos: 0 written, 0 skipped, 2 flagged, 0 failed" in result.output and "regenerate alone" in result.output
    assert not list(out.glob("*.mp4")) and len(list(out.glob("*.json"))) == 2
    assert [v["status"] for v in json.loads(report.read_text())["videos"]] == ["flagged", "flagged"]
    result = _run(*args, "--skip-existing")  # a refused video counts as done
    assert result.exit_code == 0 and "2 videos: 0 written, 2 skipped" in result.output, result.output


def test_the_pipeline_folder_checker_runs_unless_disabled(tiny_model, checkers, tmp_path):  # noqa: F811
    model = tmp_path / "with-checker"
    shutil.copytree(tiny_model, model)
    shutil.copytree(checkers / "flags", model / "safety_checker")
    spec = json.loads((model / "pipeline.json").read_text())
    spec["components"]["safety_checker"] = {"component": "safety/sd-safety-checker", "path": "safety_checker"}
    write_json(model / "pipeline.json", spec)
    result = _run("a red circle", "-o", tmp_path / "v.mp4", "--model", model, *FAST)
    assert result.exit_code == 1 and not (tmp_path / "v.mp4").exists(), result.output
    result = _run("a red circle", "-o", tmp_path / "v.mp4", "--model", model, "--no-safety-check", *FAST)
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "v.json").read_text())
    assert meta["safety_check"] is None and "safety_checker" not in meta["model"]["components"]
