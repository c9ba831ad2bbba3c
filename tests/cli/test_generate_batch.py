"""`neodragon generate` batches: a seed per (prompt, sample) and a replay command that remakes one video
alone, VBench names, --max-prompts, --skip-existing, prompt modifiers, --dtype, the batch summary, and
the batch options' usage errors (exit 2, one line, nothing written)."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
from test_generate import tiny_model  # noqa: F401 -- the module-scoped tiny pipeline fixture
from typer.testing import CliRunner

from neodragon_cli.app import app

runner = CliRunner()
FAST = ["--frames", "9", "--first-steps", "1-1-1", "--steps", "1-1-1"]
PROMPTS = ["a red circle moving left", "a blue square moving right", "a green triangle resting"]


def _run(*args):
    return runner.invoke(app, ["generate", *map(str, args)])


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def test_samples_get_their_own_seeds_and_one_replays_alone(tiny_model, prompts_file, tmp_path):  # noqa: F811
    from neodragon_cli.pipelines.flow.pipeline import sample_seed

    out, report = tmp_path / "videos", tmp_path / "run.json"
    result = _run("--prompts-file", prompts_file, "-o", out, "--model", tiny_model, "--num-samples", 2, "--max-prompts", 2,
                  "--seed", 5, "--json", report, *FAST)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "4 videos: 4 written, 0 skipped, 0 flagged, 0 failed" in result.output
    names = sorted(p.name for p in out.glob("*.mp4"))
    assert names == ["000-a-red-circle-moving-left-0.mp4", "000-a-red-circle-moving-left-1.mp4",
                     "001-a-blue-square-moving-right-0.mp4", "001-a-blue-square-moving-right-1.mp4"]  # fmt: skip
    run = json.loads(report.read_text())
    assert run["summary"]["written"] == 4 and run["summary"]["seconds_per_video"] > 0
    seeds = [(v["prompt"], v["sample"], v["seed"]) for v in run["videos"]]
    assert seeds == [(p, i, sample_seed(5, p, i)) for p in PROMPTS[:2] for i in range(2)]
    assert len({s for *_, s in seeds}) == 4
    video = run["videos"][3]
    assert json.loads((out / "001-a-blue-square-moving-right-1.json").read_text())["regenerate"] == video["regenerate"]
    replay = shlex.split(video["regenerate"])
    assert replay[:3] == ["neodragon", "generate", PROMPTS[1]] and "--num-samples" not in replay
    again = tmp_path / "again.mp4"
    replay[replay.index("-o") + 1] = str(again)
    result = runner.invoke(app, replay[1:])
    assert result.exit_code == 0, result.output
    assert again.read_bytes() == (out / "001-a-blue-square-moving-right-1.mp4").read_bytes()


def test_vbench_names_and_prompt_modifiers(tiny_model, prompts_file, tmp_path):  # noqa: F811
    plain, cinematic = tmp_path / "plain", tmp_path / "cinematic"
    for out, extra in ((plain, []), (cinematic, ["--cinematic"])):
        result = _run("--prompts-file", prompts_file, "-o", out, "--model", tiny_model, "--vbench-names", "--max-prompts", 1, *extra, *FAST)
        assert result.exit_code == 0, result.output
        assert sorted(p.name for p in out.iterdir()) == ["a red circle moving left-0.json", "a red circle moving left-0.mp4"]
    meta = json.loads((cinematic / "a red circle moving left-0.json").read_text())
    assert meta["prompt"] == PROMPTS[0] and meta["settings"]["prompt_modifier"].startswith(", cinematic")
    assert "--cinematic" in meta["regenerate"]
    assert (plain / "a red circle moving left-0.mp4").read_bytes() != (cinematic / "a red circle moving left-0.mp4").read_bytes()
    result = _run("x", "-o", tmp_path / "m.mp4", "--model", tiny_model, "--prompt-modifier", ", at night", *FAST)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m.json").read_text())["settings"]["prompt_modifier"] == ", at night"


def test_skip_existing_resumes_and_redoes_half_written_outputs(tiny_model, prompts_file, tmp_path):  # noqa: F811
    out = tmp_path / "videos"
    args = ["--prompts-file", prompts_file, "-o", out, "--model", tiny_model, *FAST]
    assert _run(*args).exit_code == 0
    first, second, third = (out / f"{i:03d}-{name}" for i, name in enumerate(
        ["a-red-circle-moving-left", "a-blue-square-moving-right", "a-green-triangle-resting"]))  # fmt: skip
    kept = first.with_suffix(".mp4").read_bytes()
    second.with_suffix(".json").unlink()  # stopped between the video and its JSON
    third.with_suffix(".mp4").unlink()
    third.with_suffix(".json").unlink()
    refused = _run(*args)
    assert refused.exit_code == 2 and "already exists" in refused.output
    result = _run(*args, "--skip-existing")
    assert result.exit_code == 0, result.output
    assert "3 videos: 2 written, 1 skipped" in result.output
    assert first.with_suffix(".mp4").read_bytes() == kept
    assert second.with_suffix(".json").is_file() and third.with_suffix(".mp4").is_file()


def test_dtype_is_applied_with_float32_islands_and_recorded(tiny_model, tmp_path):  # noqa: F811
    from neodragon_cli.pipelines.flow.pipeline import VideoPipeline

    pipe = VideoPipeline.from_pretrained(tiny_model, dtype=torch.bfloat16)
    assert pipe.mmdit.time_text_embed.timestep_embedder.linear_1.weight.dtype == torch.float32
    assert pipe.mmdit.proj_out.weight.dtype == next(pipe.vae.parameters()).dtype == torch.bfloat16
    result = _run("a red circle", "-o", tmp_path / "b.mp4", "--model", tiny_model, "--dtype", "bf16", *FAST)
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "b.json").read_text())
    assert meta["dtype"] == "bf16" and "--dtype bf16" in meta["regenerate"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["x", "--num-samples", "0"], "--num-samples must be at least 1"),
        (["--prompts-file", "EMPTY", "--max-prompts", "0"], "--max-prompts must be at least 1"),
        (["x", "--dtype", "int8"], "unknown dtype 'int8'"),
        (["--prompts-file", "EMPTY"], "has no prompts"),
        (["x", "--safety-checker", "NOT_A_CHECKER"], "is not a safety checker folder"),
        (["x", "--safety-checker", "NOT_A_CHECKER", "--no-safety-check"], "not both"),
        (["x", "--cinematic", "--prompt-modifier", ", y"], "not both"),
        (["--prompts-file", "REPEATED", "--vbench-names"], "is given twice"),
        (["x", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["x", "--batch-size", "2", "--runtime", "onnx"], "one video at a time"),
    ],
)
def test_bad_batch_inputs_exit_2_with_one_line_and_write_nothing(tiny_model, tmp_path, args, needle):  # noqa: F811
    inputs = tmp_path / "inputs"
    (inputs / "checker").mkdir(parents=True)
    (inputs / "empty.txt").write_text("\n  \n")
    (inputs / "repeated.txt").write_text("a\nb\na\n")
    paths = {"EMPTY": inputs / "empty.txt", "REPEATED": inputs / "repeated.txt", "NOT_A_CHECKER": inputs / "checker"}
    out = tmp_path / "out"
    result = _run(*[paths.get(a, a) for a in args], "-o", out / "v.mp4", "--model", tiny_model, "--json", out / "run.json")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.output, result.output
    assert not out.exists()


@pytest.mark.parametrize("mode", ["monolithic", "hybrid"])
def test_a_batch_makes_the_videos_it_makes_one_at_a_time(tiny_model, prompts_file, tmp_path, mode):  # noqa: F811
    """--batch-size 2 over 3 videos (a batch of 2, then 1): the same files and seeds as --batch-size 1,
    frames equal up to float rounding, and each video's timing says it was made in a batch. Hybrid: every
    row starts from the given first frame, its posterior drawn from its own seed."""
    import numpy as np
    from PIL import Image

    from neodragon_cli.pipelines.data.video_io import read_video

    image = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    extra = ["--mode", mode] + (["--image", image] if mode == "hybrid" else [])
    alone, together = tmp_path / "alone", tmp_path / "together"
    for out, size in ((alone, 1), (together, 2)):
        result = _run("--prompts-file", prompts_file, "-o", out, "--model", tiny_model, "--batch-size", size, "--seed", 3,
                      "--format", "png", *FAST, *extra)  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "3 videos: 3 written" in result.output
    names = sorted(p.name for p in alone.glob("*.json"))
    assert names == sorted(p.name for p in together.glob("*.json")) and len(names) == 3
    for name in names:
        a, b = json.loads((alone / name).read_text()), json.loads((together / name).read_text())
        assert a["seed"] == b["seed"] and a["regenerate"].split("-o")[0] == b["regenerate"].split("-o")[0]
        assert "--batch-size" not in b["regenerate"]
        frames_a, _ = read_video(alone / name.removesuffix(".json"))
        frames_b, _ = read_video(together / name.removesuffix(".json"))
        assert frames_a.shape == frames_b.shape
        assert abs(frames_a.astype(int) - frames_b.astype(int)).max() <= 2
    sizes = [json.loads((together / n).read_text())["timing"]["batch_size"] for n in names]
    assert sorted(sizes) == [1, 2, 2]
    first, second = (json.loads((alone / n).read_text()) for n in names[:2])
    assert first["seed"] != second["seed"]
