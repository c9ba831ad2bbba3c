"""`neodragon eval` end to end: prompts from metadata / --prompts / file names, JSON for CI,
--fail-under exit codes, --reference PSNR/SSIM, one-line usage errors with exit 2."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from neodragon_cli.app import app
from neodragon_cli.pipelines.data import shapes as S
from neodragon_cli.pipelines.data.video_io import read_video, write_video

runner = CliRunner()
WORLD = S.ShapesWorld(frames=9)


@pytest.fixture
def clips(tmp_path):
    """Three ground-truth clips with `<stem>.json` metadata beside them."""
    folder = tmp_path / "clips"
    rng = np.random.default_rng(0)
    for i in range(3):
        scene = S.sample_scene(rng, "heldout" if i == 1 else "train")
        write_video(folder / f"clip{i}.mp4", WORLD.render(scene), fps=24)
        (folder / f"clip{i}.json").write_text(json.dumps({"prompt": S.caption(scene, rng).text}))
    return folder


def _usage_error(result, needle):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and needle in result.output, result.output


def test_ground_truth_scores_high_and_json_is_written(clips, tmp_path):
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["eval", str(clips), "--json", str(out), "--fail-under", "total=0.9"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["passed"] and len(report["videos"]) == 3
    assert report["summary"]["semantic"] == 1.0 and report["summary"]["total"] > 0.95
    assert report["summary"]["count"] == 1.0
    video = report["videos"][0]
    assert video["prompt"] == json.loads((clips / "clip0.json").read_text())["prompt"]
    assert set(video["proxies"]) == {"flicker", "background_stability", "area_stability", "sharpness"}


def test_fail_under_exits_1_and_says_why(clips, tmp_path):
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["eval", str(clips), "--json", str(out), "--fail-under", "total=1.01", "--fail-under", "semantic=0.5"])
    assert result.exit_code == 1, result.output
    assert "total" in result.output and "Traceback" not in result.output
    report = json.loads(out.read_text())
    assert not report["passed"] and list(report["failed"]) == ["total"]


def test_wrong_prompts_lower_the_semantic_score(clips, tmp_path):
    spec = S.parse_prompt(json.loads((clips / "clip0.json").read_text())["prompt"])
    wrong_shape = next(s for s in S.SHAPES if s != spec.objects[0].shape)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"clip0": f"a {wrong_shape}", "clip1.mp4": "a sunset over a tiny blue box", "clip2": "two squares"}))
    result = runner.invoke(app, ["eval", str(clips), "--prompts", str(prompts), "--json", "-"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert report["videos"][0]["attributes"]["object0.shape"] is False
    assert report["summary"]["semantic"] < 1.0


def test_prompts_text_file_and_file_name_prompts(tmp_path):
    folder = tmp_path / "named"
    scene = S.Scene("black", (S.ShapeObject("square", "red", "large", "left", 0.7, 0.5),))
    write_video(folder / "a large red square moving left-0.mp4", WORLD.render(scene))
    result = runner.invoke(app, ["eval", str(folder), "--json", "-"])  # VBench-style name, no metadata
    assert result.exit_code == 0, result.output
    assert '"semantic": 1.0' in result.stdout
    lines = tmp_path / "prompts.txt"
    lines.write_text("a small red square\n")
    result = runner.invoke(app, ["eval", str(folder), "--prompts", str(lines), "--json", "-"])
    assert result.exit_code == 0 and '"object0.size": false' in result.stdout
    lines.write_text("a\nb\n")
    _usage_error(runner.invoke(app, ["eval", str(folder), "--prompts", str(lines)]), "2 prompts for 1 videos")


def test_reference_gives_psnr_and_ssim(clips, tmp_path):
    ref = tmp_path / "ref"
    for mp4 in sorted(clips.glob("*.mp4")):
        frames, _ = read_video(mp4)
        write_video(ref / mp4.stem, frames)  # PNG folders with the same stems, lossless
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["eval", str(clips), "--reference", str(ref), "--metrics", "psnr,ssim", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["summary"]["ssim"] == pytest.approx(1.0) and report["summary"]["psnr"] is None  # +inf → null
    shifted, _ = read_video(ref / "clip0")
    write_video(ref / "clip0", np.clip(shifted.astype(int) + 4, 0, 255).astype(np.uint8))
    result = runner.invoke(app, ["eval", str(clips / "clip0.mp4"), "--reference", str(ref), "--json", str(out), "--fail-under", "psnr=60"])
    assert result.exit_code == 1, result.output
    report = json.loads(out.read_text())
    assert report["videos"][0]["psnr"] == pytest.approx(20 * np.log10(255 / 4), abs=0.5)
    assert report["summary"]["semantic"] == 1.0  # --reference adds metrics to the judge


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--metrics", "fvd"], "unknown metric"),
        (["--fail-under", "beauty=0.5"], "bad --fail-under"),
        (["--fail-under", "total=high"], "bad --fail-under value"),
        (["--metrics", "psnr"], "--reference"),
        (["--metrics", "judge", "--fail-under", "psnr=20"], "needs the 'psnr' metric"),
    ],
)
def test_bad_options_are_usage_errors(clips, extra, needle):
    _usage_error(runner.invoke(app, ["eval", str(clips), *extra]), needle)


def test_bad_inputs_are_usage_errors(clips, tmp_path):
    _usage_error(runner.invoke(app, ["eval", str(tmp_path / "nope.mp4")]), "does not exist")
    (clips / "clip2.json").unlink()
    _usage_error(runner.invoke(app, ["eval", str(clips)]), "no prompt for clip2.mp4")
    empty = tmp_path / "empty"
    empty.mkdir()
    _usage_error(runner.invoke(app, ["eval", str(empty)]), "no videos")
    _usage_error(runner.invoke(app, ["eval", str(clips / "clip0.mp4"), "--reference", str(clips), "--metrics", "lpips"]), "--lpips-weights")


def test_shapes_sample_and_prompts_commands(tmp_path):
    out = tmp_path / "samples"
    result = runner.invoke(app, ["shapes", "sample", str(out), "-n", "2", "--frames", "9", "--split", "heldout", "--format", "gif"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["00000.gif", "00000.json", "00001.gif", "00001.json"]
    assert json.loads((out / "00000.json").read_text())["split"] == "heldout"
    result = runner.invoke(app, ["eval", str(out), "--fail-under", "semantic=1"])
    assert result.exit_code == 0, result.output
    _usage_error(runner.invoke(app, ["shapes", "sample", str(out)]), "not empty")
    result = runner.invoke(app, ["shapes", "prompts", "-", "-n", "50", "--seed", "3"])
    lines = result.stdout.splitlines()
    assert result.exit_code == 0 and len(set(lines)) == 50 and lines == S.prompt_corpus(50, seed=3)
