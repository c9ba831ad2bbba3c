"""The chain's report and its eval steps, on a tiny chain over the tiny real-architecture pipeline of the
prune tests: eval-teacher -> distill-te -> eval-te -> distill-decoder -> prune -> step-distill -> profile ->
eval. The report quotes what each step recorded (checked against the files it comes from); a partial run
reports the missing stages as not run; `--report` writes it again without running a step; an eval step makes
the videos `neodragon generate --prompts-file --num-samples --seed` makes and scores them as `neodragon eval`
does, with PSNR / SSIM to an earlier eval step or to a folder of generate videos."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_chain import PROMPTS, PRUNE, TE
from test_prune import tiny_pipeline

from neodragon_cli.app import app
from neodragon_cli.pipelines.data.video_io import read_video

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")
DECODER = {"world": {"height": 64, "width": 64, "frames": 9}, "data": {"patch": [9, 64, 64], "clips": 2, "judge_videos": 1},
           "decoder": {"num_features": [8, 8, 8, 8]},
           "train": {"batch_size": 2, "max_steps": 2, "log_every": 1, "checkpoint_every": 0, "precision": "fp32"}}
STEP_DISTILL = {"schedule": "1-1-1", "teacher.steps": 4, "data": {"shapes_prompts": 4, "synthetic_videos": 2, "synthetic_batch": 2},
                "train": {"batch_size": 2, "max_steps": 1, "log_every": 1, "checkpoint_every": 0}}
EVAL = {"prompts": "prompts.txt", "seed": 0, "num_samples": 2}
STAGES = ["teacher", "+ text path", "+ decoder", "+ pruning", "+ step distillation"]


def write_chain(root: Path, parent: Path, steps: dict | None = None) -> Path:
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    steps = steps or {
        "eval-teacher": {"command": "eval", "options": EVAL},
        "te": {"command": "distill-te", "recipe": "shapes/distill_te",
               "overrides": {**TE, "data": {**TE["data"], "files": [str(root / "prompts.txt")]}}},
        "eval-te": {"command": "eval", "options": {**EVAL, "reference": "eval-teacher"}},
        "decoder": {"command": "distill-decoder", "recipe": "shapes/distill_decoder", "overrides": DECODER},
        "prune": {"command": "prune", "recipe": "shapes/prune", "overrides": PRUNE},
        "step-distill": {"command": "step-distill", "recipe": "shapes/step_distill_dmd", "overrides": STEP_DISTILL},
        "profile": {"command": "profile", "options": {"runs": 1, "png": False}},
        "eval": {"command": "eval", "options": {**EVAL, "reference": "eval-teacher"}},
    }  # fmt: skip
    path = root / "chain.yaml"
    path.write_text(yaml.safe_dump({"command": "chain", "model": str(parent), "steps": steps}, sort_keys=False))
    return path


def run(chain: Path, out: Path, *args: str):
    return runner.invoke(app, ["run", str(chain), "-o", str(out), *args])


def read(path: Path):
    return json.loads(path.read_text())


def results(out: Path, folder: str) -> dict:
    """What the step's own operation recorded in its artifact."""
    return read(out / folder / "artifact" / "state.json")["operations"][-1]["results"]


def metrics(out: Path, folder: str) -> list[dict]:
    return [json.loads(line) for line in (out / folder / "artifact" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report_chain")
    return write_chain(root, tiny_pipeline(root))


@pytest.fixture(scope="module")
def out(chain, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report_run") / "out"
    result = run(chain, out)
    assert result.exit_code == 0, result.output
    return out


def test_the_report_quotes_what_every_step_recorded(out):
    report = read(out / "report.json")
    assert report["run"]["status"] == "complete" and [s["status"] for s in report["steps"]] == ["ran"] * 8
    rows = {row["stage"]: row for row in report["summary"]}
    assert [row["stage"] for row in report["summary"]] == STAGES
    # scores, time and MMDiT calls: the eval step that follows each stage
    for stage, folder in (("teacher", "01-eval-teacher"), ("+ text path", "03-eval-te"), ("+ step distillation", "08-eval")):
        summary = read(out / folder / "eval.json")["summary"]
        row = rows[stage]
        assert row["eval"] == folder[3:]
        for key in ("semantic", "quality", "total", "seconds_per_video", "mmdit_calls_per_video", "nfe_per_video", "psnr", "ssim"):
            assert row[key] == summary.get(key), (stage, key)
    assert rows["+ decoder"]["total"] is None and rows["+ pruning"]["eval"] is None  # no eval step after them
    # parameters: counted from the artifacts' headers, equal to what the commands recorded
    te, decoder, prune, step = (results(out, f) for f in ("02-te", "04-decoder", "05-prune", "06-step-distill"))
    assert rows["+ text path"]["params_text_path"] == te["params_text_path"]
    assert rows["teacher"]["params_decoder"] == decoder["params_parent_decoder"]
    assert rows["+ decoder"]["params_decoder"] == decoder["params_decoder"] < decoder["params_parent_decoder"]
    assert rows["+ decoder"]["params_mmdit"] == prune["params"][0] and rows["+ pruning"]["params_mmdit"] == prune["params"][1]
    assert rows["+ step distillation"]["params_mmdit"] == prune["params"][1]
    # NFE: the teacher's schedule with CFG counts both passes (step-distill's own figures); the calls are measured
    assert rows["teacher"]["nfe_per_video"] == step["nfe_per_video"]["teacher"] == 2 * rows["teacher"]["mmdit_calls_per_video"]
    assert rows["+ step distillation"]["nfe_per_video"] == step["nfe_per_video"]["student"] == rows["+ step distillation"]["mmdit_calls_per_video"]

    tables = report["tables"]
    heldout = [line for line in metrics(out, "02-te") if line.get("split") == "heldout"][-1]
    teacher_row, te_row = tables["table2"]["rows"]
    assert te_row["mode"] == te["mode"] and (te_row["heldout_mse"], te_row["heldout_cosine"]) == (heldout["heldout_mse"], heldout["heldout_cosine"])
    assert te_row["eval"]["total"] == read(out / "03-eval-te" / "eval.json")["summary"]["total"]
    assert teacher_row["params_text_path"] == rows["teacher"]["params_text_path"] != te["params_text_path"]
    (dec,) = tables["table3"]["rows"]
    assert dec["family"] == decoder["family"] and dec["reconstruction"]["psnr"] == decoder["reconstruction"]["psnr"]
    (pruned,) = tables["tables4_5"]["rows"]
    last_stage2 = [line for line in metrics(out, "05-prune") if line.get("stage") == 2][-1]
    assert pruned["removed_blocks"] == prune["removed_blocks"] and pruned["stage2_last"]["loss"] == last_stage2["loss"]
    (distilled,) = tables["table6"]["rows"]
    assert distilled["nfe_per_video"] == step["nfe_per_video"] and distilled["schedule"] == step["schedule"]
    (profiled,) = tables["table7"]["rows"]
    profile = read(out / "07-profile" / "profile.json")
    assert profiled["stage"] == "step-distill" and profiled["end_to_end"]["seconds"] == profile["end_to_end"]["seconds"]
    assert {k: m["median_ms"] for k, m in profiled["modules"].items()} == {k: m["latency_ms"]["median"] for k, m in profile["modules"].items()}
    assert tables["table9"]["rows"] == [] and tables["export"]["rows"] == []

    text = (out / "report.md").read_text()
    for heading in ("Tables 1 and 8", "Table 2: text path", "Table 3: decoder", "Tables 4 and 5: pruning", "Table 6: step distillation",
                    "Table 7: latency and memory", "Table 9: quantization"):
        assert f"## {heading}" in text
    assert "The chain has no quantize step." in text and "not run yet" not in text.split("## Steps")[1]
    assert f"{rows['+ text path']['total']:.3f}" in text and f"{te['params_text_path']:,}" in text
    assert f"{prune['params'][0]:,} → {prune['params'][1]:,}" in text


def test_a_partial_run_reports_the_missing_stages_as_not_run(chain, out, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    result = run(chain, copy, "--until", "eval-te")
    assert result.exit_code == 0, result.output
    report = read(copy / "report.json")
    assert report["run"]["status"] == "partial"
    rows = {row["stage"]: row for row in report["summary"]}
    assert rows["+ text path"]["total"] == read(copy / "03-eval-te" / "eval.json")["summary"]["total"]
    for stage in ("+ decoder", "+ pruning", "+ step distillation"):
        assert rows[stage]["state"] == "not run yet" and rows[stage]["params_mmdit"] == "not run yet"
    assert rows["+ step distillation"]["total"] == "not run yet"
    assert report["tables"]["table6"]["rows"] == [{"stage": "step-distill", "state": "not run yet"}]
    assert report["tables"]["table7"]["rows"] == [{"step": "profile", "stage": "step-distill", "state": "not run yet"}]
    text = (copy / "report.md").read_text()
    assert "| + step distillation (step-distill) | not run yet |" in text and "`profile` (of step-distill): not run yet." in text


def test_report_writes_the_report_again_and_runs_nothing(chain, out, tmp_path, monkeypatch):
    from neodragon_cli.pipelines import chain as chain_module

    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    before = read(copy / "report.json")
    files = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file() and p.name not in ("report.json", "report.md")}
    (copy / "report.json").unlink()
    (copy / "report.md").unlink()

    def refuse(*args, **kwargs):
        raise AssertionError("--report ran something")

    monkeypatch.setattr(chain_module, "run_chain", refuse)
    monkeypatch.setattr(chain_module, "content_id", refuse)  # not even the cache check (it hashes artifacts)
    result = run(chain, copy, "--report")
    assert result.exit_code == 0, result.output
    again = read(copy / "report.json")
    assert {k: v for k, v in again.items() if k != "created"} == {k: v for k, v in before.items() if k != "created"}
    assert (copy / "report.md").read_text().split("\n", 4)[4] == (out / "report.md").read_text().split("\n", 4)[4]
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file() and p.name not in ("report.json", "report.md")} == files
    (copy / "05-prune" / "artifact" / "state.json").unlink()  # a finished step's record gone: said, not skipped
    result = run(chain, copy, "--report")
    assert result.exit_code == 2 and "05-prune/artifact/state.json is missing" in result.output


def test_eval_steps_make_the_videos_generate_makes_and_score_them_as_eval_does(chain, out, tmp_path):
    model = yaml.safe_load(chain.read_text())["model"]
    generated = tmp_path / "generated"
    result = runner.invoke(app, ["generate", "--prompts-file", str(chain.parent / "prompts.txt"), "--num-samples", "2", "--seed", "0",
                                 "-o", str(generated), "--model", model, "--no-safety-check"])  # fmt: skip
    assert result.exit_code == 0, result.output
    teacher = out / "01-eval-teacher"
    evaluation = read(teacher / "eval.json")
    names = sorted(p.name for p in generated.glob("*.mp4"))
    assert names == sorted(v["video"] for v in evaluation["videos"]) and len(names) == 2 * len(PROMPTS)
    for name in names:
        made = read((generated / name).with_suffix(".json"))
        ours = read((teacher / "videos" / name).with_suffix(".json"))
        assert (ours["prompt"], ours["sample"], ours["seed"]) == (made["prompt"], made["sample"], made["seed"])
    frames, _ = read_video(generated / names[0])
    assert np.array_equal(frames, read_video(teacher / "videos" / names[0])[0])

    # the same scores as `neodragon eval` over the step's videos, and with --reference over another step's
    scored = tmp_path / "scored.json"
    assert runner.invoke(app, ["eval", str(teacher / "videos"), "--json", str(scored)]).exit_code == 0
    assert read(scored)["summary"] == {k: evaluation["summary"][k] for k in read(scored)["summary"]}
    result = runner.invoke(app, ["eval", str(out / "03-eval-te" / "videos"), "--reference", str(teacher / "videos"), "--json", str(scored)])
    assert result.exit_code == 0, result.output
    te_summary = read(out / "03-eval-te" / "eval.json")["summary"]
    assert read(scored)["summary"] == {k: te_summary[k] for k in read(scored)["summary"]}
    assert 0 < te_summary["ssim"] < 1 and te_summary["psnr"] > 0

    # a folder of generate videos as the reference: the same videos, so SSIM 1 (PSNR +inf, null in JSON)
    root = tmp_path / "folder_ref"
    root.mkdir()
    path = write_chain(root, Path(model), {"eval": {"command": "eval", "options": {**EVAL, "reference": str(generated)}}})
    result = run(path, root / "out")
    assert result.exit_code == 0, result.output
    summary = read(root / "out" / "01-eval" / "eval.json")["summary"]
    # the same frames score the same up to float32 rounding in the judge's proxies (threads may change the sum order)
    assert summary["ssim"] == pytest.approx(1.0) and summary["psnr"] is None
    assert summary["total"] == pytest.approx(evaluation["summary"]["total"], abs=1e-6)
    # a reference that lacks a video of the step is refused before anything runs
    path = write_chain(root, Path(model), {"eval": {"command": "eval", "options": {**EVAL, "num_samples": 3, "reference": str(generated)}}})
    result = run(path, root / "again")
    assert result.exit_code == 2 and "no reference video for 'a red circle moving left' seed" in result.output
    assert not (root / "again").exists()
