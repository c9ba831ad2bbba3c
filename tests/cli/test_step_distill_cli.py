"""`neodragon step-distill` end to end on a tiny pipeline (tiny T5, 4-block MMDiT, tiny VAE; 64x64, 9 frames,
1-1-1 with CFG 3/2): each method (mean-flows included) runs a few steps with finite, moving losses; the artifact verifies, records
the distilled schedule without CFG, and generates in monolithic and hybrid mode; resume is bit-exact for every
model and optimizer; bad inputs exit 2 with one line and write nothing."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_prune import tiny_pipeline

from neodragon_cli.app import app
from neodragon_cli.artifacts import read_state, verify_artifact
from neodragon_cli.atomic import write_text

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["train.batch_size=2", "train.lr=1e-3", "critic.lr=1e-3", "train.log_every=1", "train.checkpoint_every=0",
        "data.shapes_prompts=20", "data.synthetic_videos=4", "data.synthetic_batch=2", "teacher.steps=4"]


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    return tiny_pipeline(tmp_path_factory.mktemp("step_distill"))


def distill(parent: Path, out: Path, method: str, *extra: str, resume: bool = False):
    args = ["step-distill", f"shapes/step_distill_{method}", f"parent={parent}", *TINY, *extra, "-o", str(out)]
    return runner.invoke(app, args + (["--resume", "--overwrite"] if resume else []))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "mmdit" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method, losses", [
    ("dmd", ["fake/loss", "student/loss"]),
    ("progressive", ["loss"]),
    ("adversarial", ["head/loss", "student/loss"]),
    ("mean_flows", ["loss", "mse", "dudt_abs"]),
])
def test_each_method_trains_and_writes_a_distilled_pipeline(parent, tmp_path, method, losses):
    out = tmp_path / method
    result = distill(parent, out, method, "train.max_steps=3", "schedule=2-2-2")
    assert result.exit_code == 0, result.output
    assert verify_artifact(out) == []
    lines = metrics(out)
    assert [line["step"] for line in lines] == [1, 2, 3]
    for key in losses:
        values = [line[key] for line in lines]
        assert all(math.isfinite(v) for v in values) and len(set(values)) == 3, (key, values)
    sampling = json.loads((out / "pipeline.json").read_text())["sampling"]
    assert sampling["first_steps"] == sampling["video_steps"] == [2, 2, 2]
    assert sampling["guidance"] == sampling["video_guidance"] == 0
    operation = read_state(out)["operations"][-1]
    assert operation["operation"] == "step-distill" and operation["results"]["method"] == method.replace("_", "-")
    assert operation["results"]["steps"] == 3 and operation["results"]["teacher_guidance"] == [3.0, 2.0]
    assert operation["results"]["nfe_per_video"] == {"teacher": 12, "student": 12}  # 2 frames x 3 stages: 1 x 2 vs 2 x 1
    student, teacher = weights(out), weights(parent)
    interval = {k for k in student if ".interval_embedder." in k}  # mean-flows: the step-length embedding
    assert bool(interval) == (method == "mean_flows")
    assert student.keys() - interval == teacher.keys() and any(not torch.equal(student[k], teacher[k]) for k in teacher)
    if method != "dmd":
        assert len(list((out.with_name(method + ".work") / "synthetic").glob("shard-*.safetensors"))) == 2


def test_runs_of_two_methods_share_one_synthetic_cache(parent, tmp_path):
    cache = tmp_path / "teacher-videos"
    assert distill(parent, tmp_path / "p", "progressive", "train.max_steps=1", f"data.synthetic_dir={cache}").exit_code == 0
    shards = {path: path.stat().st_mtime_ns for path in cache.glob("shard-*.safetensors")}
    assert len(shards) == 2 and not (tmp_path / "p.work" / "synthetic").exists()
    assert distill(parent, tmp_path / "m", "mean_flows", "train.max_steps=1", f"data.synthetic_dir={cache}").exit_code == 0
    assert {path: path.stat().st_mtime_ns for path in cache.glob("shard-*.safetensors")} == shards  # reused, not rewritten


@pytest.mark.slow
def test_a_mean_flows_student_exports_and_onnx_runtime_reproduces_its_video(parent, tmp_path):
    """The stage graphs of a Mean-Flows student take the step's length (`interval_embedding`), which the
    ONNX pipeline computes from the end of each step the sampler passes."""
    from neodragon_cli.pipelines.deploy.runtime import load_onnx_pipeline
    from neodragon_cli.pipelines.flow.pipeline import VideoPipeline

    out, exported = tmp_path / "mf", tmp_path / "exported"
    assert distill(parent, out, "mean_flows", "train.max_steps=1", "schedule=1-1-1").exit_code == 0
    result = runner.invoke(app, ["export", str(out), "-o", str(exported)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((exported / "export.json").read_text())
    assert "interval_embedding" in [i["name"] for i in manifest["graphs"]["mmdit_stage2"]["inputs"]]
    torch_pipe, onnx_pipe = VideoPipeline.from_pretrained(out), load_onnx_pipeline(exported)
    reference = torch_pipe.generate("a red circle moving left", torch_pipe.settings(), seed=3).frames
    frames = onnx_pipe.generate("a red circle moving left", onnx_pipe.settings(), seed=3).frames
    assert reference.shape == frames.shape
    assert (np.abs(reference.astype(int) - frames.astype(int)) <= 2).mean() >= 0.999


@pytest.mark.parametrize("method", ["dmd", "mean_flows"])
def test_the_output_generates_with_its_schedule_by_default_and_in_hybrid_mode(parent, tmp_path, method):
    """(mean-flows: the saved MMDiT refuses a call without the step's end, so this also checks that the
    pipeline's sampler gives it one)"""
    out = tmp_path / "distilled"
    assert distill(parent, out, method, "train.max_steps=1", "schedule=1-1-1").exit_code == 0
    summary = tmp_path / "run.json"
    video = tmp_path / "v.mp4"
    result = runner.invoke(app, ["generate", "a red circle moving left", "--model", str(out), "-o", str(video),
                                 "--json", str(summary)])
    assert result.exit_code == 0, result.output
    assert video.stat().st_size > 0
    frame = tmp_path / "first.png"
    Image.fromarray(np.full((64, 64, 3), 90, dtype=np.uint8)).save(frame)
    hybrid = tmp_path / "h.mp4"
    result = runner.invoke(app, ["generate", "a red circle moving left", "--model", str(out), "-o", str(hybrid),
                                 "--mode", "hybrid", "--image", str(frame)])
    assert result.exit_code == 0, result.output
    assert hybrid.stat().st_size > 0
    run = json.loads(summary.read_text())["videos"][0]
    assert run["settings"]["first_steps"] == run["settings"]["video_steps"] == [1, 1, 1]
    assert run["settings"]["guidance"] == run["settings"]["video_guidance"] == 0
    assert run["timing"]["components"]["mmdit"]["calls"] == 6  # 2 latent frames x 3 stages x 1 step, no CFG batch
    if method == "mean_flows":  # a Mean-Flows student is no teacher: distilling it again exits 2 with one line
        again = distill(out, tmp_path / "again", "dmd", "teacher.guidance=0", "teacher.video_guidance=0")
        assert again.exit_code == 2 and "is a Mean-Flows student" in again.output, again.output
        assert len(again.output.strip().splitlines()) == 1


def _checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")


@pytest.mark.parametrize("method", ["dmd", "mean_flows", pytest.param("adversarial", marks=pytest.mark.slow)])
def test_resume_is_bit_exact_for_every_model_and_optimizer(parent, tmp_path, method):
    run = ["train.max_steps=4", "train.checkpoint_every=2", "train.keep_every=2", "schedule=2-2-2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert distill(parent, straight, method, *run).exit_code == 0
    assert distill(parent, resumed, method, *run).exit_code == 0
    work = resumed.with_name("resumed.work")
    (work / "run" / "checkpoints" / "step-00000004.pt").unlink()  # resumes from step 2
    result = distill(parent, resumed, method, *run, resume=True)
    assert result.exit_code == 0, result.output
    a = _checkpoint(straight.with_name("straight.work") / "run" / "checkpoints" / "step-00000004.pt")
    b = _checkpoint(work / "run" / "checkpoints" / "step-00000004.pt")
    trained = {"dmd": {"student", "fake"}, "adversarial": {"student", "head"}, "mean_flows": {"student"}}[method]
    assert set(a["models"]) == set(a["optimizers"]) == trained
    for part in ("models", "optimizers"):
        _assert_same(a[part], b[part], part)
    wa, wb = weights(straight), weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [line["step"] for line in metrics(resumed)] == [1, 2, 3, 4]


def _no_cfg_parent(parent: Path, root: Path) -> Path:
    """The tiny parent as a train-t2v model trained without prompt dropout (its recipe says so)."""
    import shutil

    folder = root / "no_cfg"
    shutil.copytree(parent, folder)
    write_text(folder / "recipe.yaml", "command: train-t2v\nflow: {text_dropout: 0.0}\n")
    return folder


@pytest.mark.parametrize("extra, message", [
    (["method=lcm"], "unknown method 'lcm'"),
    (["method=progressive", "schedule=3-3-3", "teacher.steps=16"], "do not divide the teacher's 16"),
    (["schedule=0-1-1"], "schedule"),
    (["method=mean-flows", "student.prediction=clean"], "student.prediction must be velocity"),
    (["method=mean-flows", "mean_flows.fraction=1.5"], "mean_flows.fraction must be in [0, 1]"),
])
def test_bad_recipes_exit_2_with_one_line_and_nothing_written(parent, tmp_path, extra, message):
    out = tmp_path / "out"
    result = distill(parent, out, "dmd", *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists() and not out.with_name("out.work").exists()


def test_a_teacher_without_cfg_asked_for_cfg_exits_2(parent, tmp_path):
    no_cfg = _no_cfg_parent(parent, tmp_path)
    out = tmp_path / "out"
    result = runner.invoke(app, ["step-distill", "shapes/step_distill_dmd", f"parent={no_cfg}", *TINY, "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert "cannot be sampled with CFG" in result.output and "text_dropout 0" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists() and not out.with_name("out.work").exists()
    # the same teacher distilled without CFG is fine, and the step-distilled output refuses CFG in turn
    first = tmp_path / "first"
    ok = runner.invoke(app, ["step-distill", "shapes/step_distill_dmd", f"parent={no_cfg}", *TINY, "train.max_steps=1",
                             "schedule=1-1-1", "teacher.guidance=0", "teacher.video_guidance=0", "-o", str(first)])
    assert ok.exit_code == 0, ok.output
    again = runner.invoke(app, ["step-distill", "shapes/step_distill_dmd", f"parent={first}", *TINY,
                                "teacher.guidance=4", "-o", str(tmp_path / "again")])
    assert again.exit_code == 2 and "step-distilled" in again.output
