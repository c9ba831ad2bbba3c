"""`neodragon run CHAIN` on a tiny chain (distill-te -> prune -> eval) over the tiny real-architecture
pipeline the prune tests build: it runs end to end with every artifact verifying and linked to its
parent; a second run runs nothing; an override of one step reruns that step and the later ones only;
`--from` / `--until`; a stopped chain continues with the training step's own resume and ends with the
same weights as an uninterrupted run. A profile step on its own; a slow test adds export, quantize and
profile and evaluates the quantized graphs through ONNX Runtime."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import yaml
from test_prune import tiny_pipeline
from typer.testing import CliRunner

from neodragon_cli.app import app
from neodragon_cli.artifacts import read_state, verify_artifact
from neodragon_cli.pipelines.chain import load_plan
from neodragon_cli.pipelines.train.trainer import MultiModelTrainer

runner = CliRunner()
PROMPTS = ["a red circle moving left", "a small green triangle drifting upward"]
TE = {"mode": "rm", "data": {"shapes_prompts": 0, "heldout": 1, "cache_shard": 128, "teacher_batch": 64},
      "student": {"d_model": 8, "num_layers": 1, "num_heads": 2, "d_ff": 16},
      "adapter": {"layer_depths": [16, 16], "skips": [True, True]},
      "train": {"batch_size": 2, "max_steps": 2, "checkpoint_every": 0, "log_every": 1}}
PRUNE = {"world": {"height": 64, "width": 64, "frames": 9}, "data.videos": 4, "calibration.shapes_prompts": 2,
         "calibration.videos_per_prompt": 1, "blocks": {"policy": "explicit", "explicit": [1]},
         "train": {"batch_size": 4, "lr": 1e-3, "precision": "fp32", "log_every": 1, "checkpoint_every": 0},
         "stage1.steps": 3, "stage2.steps": 3}


def write_chain(root: Path, parent: Path, *, export: bool = False) -> Path:
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    steps = {
        "te": {"command": "distill-te", "recipe": "shapes/distill_te",
               "overrides": {**TE, "data": {**TE["data"], "files": [str(root / "prompts.txt")]}}},
        "prune": {"command": "prune", "recipe": "shapes/prune", "overrides": PRUNE},
        "eval": {"command": "eval", "options": {"prompts": "prompts.txt", "seed": 0}},
    }
    if export:
        steps["export"] = {"command": "export"}
        steps["quantize"] = {"command": "quantize", "options": {"backend": "ort", "videos": 1, "heldout_samples": 1,
                                                                "qnn": False, "end_to_end": False, "calibration": 2}}
        steps["profile"] = {"command": "profile", "options": {"runs": 1, "png": False}}
        steps["eval-onnx"] = {"command": "eval", "options": {"shapes_prompts": 1}}
    path = root / "chain.yaml"
    path.write_text(yaml.safe_dump({"command": "chain", "model": str(parent), "steps": steps}, sort_keys=False))
    return path


def run(chain: Path, out: Path, *args: str):
    return runner.invoke(app, ["run", str(chain), "-o", str(out), *args])


def states(out: Path) -> dict[str, str]:
    return {s["name"]: s["state"] for s in json.loads((out / "run.json").read_text())["steps"]}


def weights_hash(artifact: Path) -> str:
    return read_state(artifact)["files"]["mmdit/diffusion_pytorch_model.safetensors"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chain")
    return write_chain(root, tiny_pipeline(root))


@pytest.fixture(scope="module")
def first(chain, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("first") / "out"
    result = run(chain, out)
    assert result.exit_code == 0, result.output
    return out


def copy_of(first: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(first, out)
    return out


def test_runs_end_to_end_with_verified_linked_artifacts(chain, first):
    report = json.loads((first / "run.json").read_text())
    assert report["status"] == "complete" and [s["state"] for s in report["steps"]] == ["ran"] * 3
    te, prune = first / "01-te" / "artifact", first / "02-prune" / "artifact"
    assert verify_artifact(te) == [] and verify_artifact(prune) == []
    ops = read_state(prune)["operations"]
    assert [op["operation"] for op in ops] == ["distill-te", "prune"]
    assert ops[1]["parent"]["hash"] == read_state(te)["operations"][-1]["output"]
    step = json.loads((first / "02-prune" / "step.json").read_text())
    assert step["state"] == "ran" and step["key"] == report["steps"][1]["key"]
    assert step["key_parts"]["parent"] == read_state(te)["operations"][-1]["output"]
    assert report["steps"][1]["artifact"] == "02-prune/artifact" and report["steps"][1]["results"] == {"steps": 3}
    evaluation = json.loads((first / "03-eval" / "eval.json").read_text())
    assert [v["prompt"] for v in evaluation["videos"]] == PROMPTS
    assert evaluation["summary"]["videos"] == 2 and evaluation["summary"]["runtime"] == "torch"
    assert 0 <= evaluation["summary"]["total"] <= 1 and report["steps"][2]["results"]["total"] == evaluation["summary"]["total"]
    assert all((first / "03-eval" / "videos" / v["video"]).stat().st_size > 0 for v in evaluation["videos"])
    # the eval step evaluated the pruned pipeline, not the original parent
    assert json.loads((first / "03-eval" / "step.json").read_text())["parent"] == str(first / "02-prune" / "artifact")


def test_a_second_run_with_nothing_changed_runs_no_step(chain, first, tmp_path):
    out = copy_of(first, tmp_path)  # a copy: keys hold content hashes, not paths
    rewritten = ("run.json", "report.json", "report.md")  # the run's record and its report
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name not in rewritten}
    result = run(chain, out)
    assert result.exit_code == 0, result.output
    assert states(out) == {"te": "cached", "prune": "cached", "eval": "cached"}
    assert "0 ran, 3 cached" in result.output
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name not in rewritten} == before


def test_one_changed_override_reruns_that_step_and_the_later_ones(chain, first, tmp_path):
    out = copy_of(first, tmp_path)
    te_state = (out / "01-te" / "artifact" / "state.json").read_bytes()
    result = run(chain, out, "steps.prune.stage2.steps=2")
    assert result.exit_code == 0, result.output
    assert states(out) == {"te": "cached", "prune": "ran", "eval": "ran"}
    assert (out / "01-te" / "artifact" / "state.json").read_bytes() == te_state
    assert read_state(out / "02-prune" / "artifact")["operations"][-1]["results"]["stage2_steps"] == 2
    assert verify_artifact(out / "02-prune" / "artifact") == []
    again = run(chain, out, "steps.prune.stage2.steps=2")  # the new configuration is cached in turn
    assert again.exit_code == 0 and set(states(out).values()) == {"cached"}


def test_an_eval_option_change_reruns_only_the_eval(chain, first, tmp_path):
    out = copy_of(first, tmp_path)
    result = run(chain, out, "steps.eval.seed=1")
    assert result.exit_code == 0, result.output
    assert states(out) == {"te": "cached", "prune": "cached", "eval": "ran"}


def test_from_reruns_from_a_step_and_until_stops_after_one(chain, first, tmp_path):
    out = copy_of(first, tmp_path)
    old = weights_hash(out / "02-prune" / "artifact")
    result = run(chain, out, "--from", "prune", "--until", "prune")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["status"] == "partial"
    assert states(out) == {"te": "cached", "prune": "ran", "eval": "pending"}
    assert weights_hash(out / "02-prune" / "artifact") == old  # the same training again, bit for bit
    result = run(chain, out)  # the new prune artifact (its metrics differ) is a new parent for eval
    assert result.exit_code == 0, result.output
    assert states(out) == {"te": "cached", "prune": "cached", "eval": "ran"}


def test_a_stopped_chain_resumes_with_the_training_steps_own_resume(chain, first, tmp_path, monkeypatch):
    fit = MultiModelTrainer.fit
    calls = []

    def interrupted_fit(self, on_step_end=None):
        def hook(trainer, step):
            if on_step_end is not None:
                on_step_end(trainer, step)
            if "prune" in str(trainer.out_dir) and "stage2" in str(trainer.out_dir) and step == 2 and not calls:
                calls.append(step)
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the trainer stops after this step and checkpoints

        return fit(self, hook)

    monkeypatch.setattr(MultiModelTrainer, "fit", interrupted_fit)
    out = copy_of(first, tmp_path)
    result = run(chain, out, "--from", "prune")
    assert result.exit_code == 130, result.output
    assert calls == [2] and states(out) == {"te": "cached", "prune": "stopped", "eval": "pending"}
    assert json.loads((out / "run.json").read_text())["status"] == "stopped"
    assert not (out / "02-prune" / "artifact").exists()
    assert list((out / "02-prune" / "artifact.work" / "stage2" / "checkpoints").glob("*.pt"))
    monkeypatch.setattr(MultiModelTrainer, "fit", fit)
    result = run(chain, out)
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output and states(out) == {"te": "cached", "prune": "ran", "eval": "ran"}
    # the resumed pruning ends where the uninterrupted one did
    assert weights_hash(out / "02-prune" / "artifact") == weights_hash(first / "02-prune" / "artifact")


def test_a_killed_step_continues_from_its_checkpoints(chain, first, tmp_path):
    out = copy_of(first, tmp_path)
    record = json.loads((out / "02-prune" / "step.json").read_text())
    (out / "02-prune" / "step.json").write_text(json.dumps({**record, "state": "running"}))  # as a killed process leaves it
    shutil.rmtree(out / "02-prune" / "artifact")
    result = run(chain, out)
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output and states(out)["prune"] == "ran"
    assert weights_hash(out / "02-prune" / "artifact") == weights_hash(first / "02-prune" / "artifact")
    assert verify_artifact(out / "02-prune" / "artifact") == []


def test_a_failed_step_is_recorded_and_the_next_run_continues(chain, first, tmp_path, monkeypatch):
    from neodragon_cli.pipelines import chain as chain_module

    out = copy_of(first, tmp_path)
    def broken(ctx):
        raise RuntimeError("disk full")

    monkeypatch.setitem(chain_module.STEP_KINDS, "eval", dataclasses.replace(chain_module.STEP_KINDS["eval"], run=broken))
    result = run(chain, out, "steps.eval.seed=2")
    assert result.exit_code == 1 and "disk full" in result.output
    report = json.loads((out / "run.json").read_text())
    assert report["status"] == "failed" and report["steps"][2]["error"] == "RuntimeError: disk full"
    monkeypatch.undo()
    result = run(chain, out, "steps.eval.seed=2")
    assert result.exit_code == 0, result.output
    assert states(out) == {"te": "cached", "prune": "cached", "eval": "ran"}


def test_plan_keys_do_not_depend_on_paths_but_on_the_resolved_recipe(chain, tmp_path):
    plan = load_plan(chain)
    moved = tmp_path / "moved.yaml"
    shutil.copy(chain, moved)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    assert [s.config_text for s in load_plan(moved).steps] == [s.config_text for s in plan.steps]
    changed = load_plan(chain, ["steps.te.train.lr=0.01"])
    assert changed.steps[0].config_text != plan.steps[0].config_text
    assert [s.config_text for s in changed.steps[1:]] == [s.config_text for s in plan.steps[1:]]


@pytest.mark.slow
def test_a_chain_through_export_evaluates_with_onnx_runtime(tmp_path):
    chain = write_chain(tmp_path, tiny_pipeline(tmp_path), export=True)
    out = tmp_path / "out"
    result = run(chain, out)
    assert result.exit_code == 0, result.output
    assert set(states(out).values()) == {"ran"}
    exported = out / "04-export" / "artifact"
    assert verify_artifact(exported) == []
    assert [op["operation"] for op in read_state(exported)["operations"]] == ["distill-te", "prune", "export"]
    quantized = out / "05-quantize" / "artifact"
    assert verify_artifact(quantized) == []
    assert [op["operation"] for op in read_state(quantized)["operations"]] == ["distill-te", "prune", "export", "quantize"]
    assert json.loads((out / "06-profile" / "profile.json").read_text())["target"]["kind"] == "quantized"
    assert json.loads((out / "07-eval-onnx" / "eval.json").read_text())["summary"]["runtime"] == "onnx"
    assert json.loads((out / "07-eval-onnx" / "step.json").read_text())["parent"] == str(quantized)
    # the report's Table 9 quotes quantize.json; the graphs have the parameters of the weights they were exported from
    report = json.loads((out / "report.json").read_text())
    (table9,) = report["tables"]["table9"]["rows"]
    recorded = json.loads((quantized / "quantize.json").read_text())
    assert {name: g["sqnr_db"] for name, g in table9["graphs"].items()} == {name: e["sqnr_db"] for name, e in recorded["graphs"].items()}
    rows = {row["stage"]: row for row in report["summary"]}
    assert list(rows) == ["teacher", "+ text path", "+ pruning", "+ export", "+ quantization"]
    assert rows["+ quantization"]["params_mmdit"] == rows["+ pruning"]["params_mmdit"] and rows["+ quantization"]["params_note"]
    assert rows["+ quantization"]["runtime"] == "onnx" and rows["+ quantization"]["eval"] == "eval-onnx"
    assert rows["+ export"]["eval"] is None and report["tables"]["table7"]["rows"][0]["target"] == "quantized"


def test_a_profile_step_writes_the_report_of_its_parent(chain, tmp_path):
    path = tmp_path / "profile.yaml"
    model = yaml.safe_load(chain.read_text())["model"]
    path.write_text(yaml.safe_dump({"command": "chain", "model": model,
                                    "steps": {"profile": {"command": "profile", "options": {"runs": 1}}}}))
    out = tmp_path / "out"
    result = run(path, out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "01-profile" / "profile.json").read_text())
    assert report["runtime"] == "torch" and report["target"]["path"] == model and report["modules"]
    assert (out / "01-profile" / "profile.png").read_bytes()[:4] == b"\x89PNG"
    results = json.loads((out / "run.json").read_text())["steps"][0]["results"]
    assert results["end_to_end_s"] > 0 and set(results["median_ms"]) == set(report["modules"])
    assert run(path, out).exit_code == 0 and states(out) == {"profile": "cached"}
