"""`neodragon profile`: bad input exits 2 with one line before any work; --analytic prints the compute
model; a measured run writes a schema-valid JSON and a PNG, and --fail-over / --max-regression exit 1
exactly when exceeded."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from neodragon_cli.app import app

runner = CliRunner()
EMBEDDED = "shapes-teacher"
SMALL = ["--height", "64", "--width", "64", "--frames", "17", "--steps", "1-1-1"]


def one_line_exit_2(result, message):
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.fixture
def export_dir(tmp_path):
    folder = tmp_path / "exported"
    folder.mkdir()
    (folder / "export.json").write_text(json.dumps({"format": "neodragon-export/1", "graphs": {}}))
    return folder


@pytest.mark.parametrize(
    "arguments, message",
    [
        ([EMBEDDED, "--runtime", "tflite"], "unknown runtime 'tflite'"),
        ([EMBEDDED, "--fail-over", "mmdit_stage2"], "bad --fail-over"),
        ([EMBEDDED, "--fail-over", "mmdit=fast"], "bad --fail-over"),
        ([EMBEDDED, "--max-regression", "10%"], "give --baseline and --max-regression together"),
        ([EMBEDDED, "--runs", "0"], "--runs must be at least 1"),
        ([EMBEDDED, "--runtime", "onnx"], "make an export first"),
        ([EMBEDDED, "--steps", "1-x-1"], "--steps"),
        ([EMBEDDED, "--device", "Snapdragon 8 Elite QRD"], "--device names an AI Hub device"),
        (["real:neodragon", "--runtime", "onnx"], "runs with --runtime torch only"),
        (["real:sd3", "--analytic"], "unknown real-size pipeline"),
        ([EMBEDDED, "--analytic", "--png", "x.png"], "need a measurement"),
        (["no-such-model-here"], "no model folder"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, arguments, message):
    one_line_exit_2(runner.invoke(app, ["profile", *arguments, "--json", str(tmp_path / "p.json")]), message)
    assert not (tmp_path / "p.json").exists()


def test_a_folder_that_is_none_of_the_three_exits_2(tmp_path):
    (tmp_path / "x").mkdir()
    one_line_exit_2(runner.invoke(app, ["profile", str(tmp_path / "x")]), "none of a model folder, an export or a quantize artifact")


def test_torch_on_an_export_exits_2(export_dir):
    one_line_exit_2(runner.invoke(app, ["profile", str(export_dir), "--runtime", "torch"]), "needs a model folder")


def test_a_bad_baseline_exits_2(tmp_path):
    (tmp_path / "old.json").write_text("{}")
    result = runner.invoke(app, ["profile", EMBEDDED, "--baseline", str(tmp_path / "old.json"), "--max-regression", "10%"])
    one_line_exit_2(result, "is not a profile report")


def test_aihub_without_a_token_exits_2_before_any_work(export_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(tmp_path / "missing.ini"))
    monkeypatch.setenv("HOME", str(tmp_path))
    result = runner.invoke(app, ["profile", str(export_dir), "--runtime", "aihub", "--device", "Snapdragon 8 Elite QRD",
                                 "--json", str(tmp_path / "p.json")])  # fmt: skip
    one_line_exit_2(result, "qai-hub")
    assert "configure --api_token" in result.output or "pip install qai-hub" in result.output
    assert not (tmp_path / "p.json").exists()


def test_qnn_without_the_plugin_exits_2(export_dir, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime_qnn" else find_spec(name, *a))
    one_line_exit_2(runner.invoke(app, ["profile", str(export_dir), "--runtime", "qnn"]), "needs the onnxruntime-qnn package")


def test_analytic_alone_prints_the_compute_model(tmp_path):
    from neodragon_cli.pipelines.deploy.profile import validate

    out = tmp_path / "a.json"
    result = runner.invoke(app, ["profile", "--analytic", EMBEDDED, *SMALL, "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "2t/(t+1) = 1.50x" in result.output  # 17 frames: 3 latent frames
    report = json.loads(out.read_text())
    assert validate(report) == [] and report["runtime"] == "none" and report["modules"] == {}
    flops = report["analytic"]["flops"]
    assert {"text_encoder", "mmdit_stage0", "mmdit_stage1", "mmdit_stage2", "decoder"} <= set(flops)
    assert flops["mmdit_stage0"]["flops"] < flops["mmdit_stage2"]["flops"]
    assert report["analytic"]["figures"]["combined_speedup_limit"] == pytest.approx(90.02, abs=0.01)


@pytest.mark.slow
def test_real_size_neodragon_flops_per_stage(tmp_path):
    out = tmp_path / "real.json"
    result = runner.invoke(app, ["profile", "--analytic", "real:neodragon", "--json", str(out)])
    assert result.exit_code == 0, result.output
    flops = json.loads(out.read_text())["analytic"]["flops"]
    # the longest-history stage calls of the 1.51B 18-block MMDiT at 49 x 320 x 512 (408 / 648 / 1728 tokens)
    assert [round(flops[f"mmdit_stage{s}"]["per_call_max"] / 1e12, 2) for s in range(3)] == [0.42, 0.68, 1.97]
    assert flops["sr"]["calls"] == 49


@pytest.mark.slow
def test_measured_run_json_png_budgets_and_regressions(tmp_path, one_thread):
    from neodragon_cli.pipelines.deploy.profile import schema, validate

    out, png = tmp_path / "p.json", tmp_path / "p.png"
    result = runner.invoke(app, ["profile", EMBEDDED, *SMALL, "--runs", "2", "--json", str(out), "--png", str(png),
                                 "--fail-over", "mmdit=600000"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert validate(report) == [] and report["checks"]["passed"]
    assert {"text_encoder", "mmdit_stage0", "mmdit_stage1", "mmdit_stage2", "decoder"} <= set(report["modules"])
    for entry in report["modules"].values():
        assert entry["latency_ms"]["min"] <= entry["latency_ms"]["median"] and len(entry["latency_ms"]["runs"]) == 2
        assert entry["weights_mb"] > 0 and entry["peak_mb"] >= entry["weights_mb"]
    assert report["end_to_end"]["seconds"] > 0 and png.read_bytes()[:4] == b"\x89PNG"
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(report, schema())

    # a budget below the measured median: exit 1, the report still written
    stage2 = report["modules"]["mmdit_stage2"]["latency_ms"]["median"]
    result = runner.invoke(app, ["profile", EMBEDDED, *SMALL, "--runs", "1", "--fail-over", f"mmdit_stage2={stage2 / 100:.4f}",
                                 "--json", str(tmp_path / "q.json")])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "mmdit_stage2" in result.output and json.loads((tmp_path / "q.json").read_text())["checks"]["passed"] is False

    # a baseline 10x faster: regression; the same baseline with a huge threshold: no regression
    fast = json.loads(out.read_text())
    for entry in fast["modules"].values():
        entry["latency_ms"]["median"] /= 10
    (tmp_path / "fast.json").write_text(json.dumps(fast))
    result = runner.invoke(app, ["profile", EMBEDDED, *SMALL, "--runs", "1", "--baseline", str(tmp_path / "fast.json"), "--max-regression", "10%"])
    assert result.exit_code == 1 and "baseline" in result.output, result.output
    result = runner.invoke(app, ["profile", EMBEDDED, *SMALL, "--runs", "1", "--baseline", str(tmp_path / "fast.json"), "--max-regression", "100000%"])
    assert result.exit_code == 0, result.output
