"""`neodragon components inspect` on a golden checkpoint and on a damaged copy of it."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from neodragon_cli.app import app

runner = CliRunner()
pytestmark = pytest.mark.golden


def test_inspect_reports_kind_params_dtype(golden_dir, tmp_path):
    folder = golden_dir / "pyramid_flow" / "mmdit" / "checkpoint"
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    report_path = tmp_path / "r.json"
    result = runner.invoke(app, ["components", "inspect", str(folder), "--json", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["component"] == "mmdit/pyramid-flow"
    assert report["parameters"] == sum(t.numel() for t in state.values())
    assert report["dtypes"] == {"F32": report["parameters"]}
    assert report["load"] == "ok"


def test_inspect_names_missing_and_unexpected_keys(golden_dir, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(golden_dir / "pyramid_flow" / "mmdit" / "checkpoint", folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    dropped = sorted(state)[0]
    state.pop(dropped)
    state["bogus.weight"] = next(iter(state.values())).clone()
    save_file(state, str(weights))
    result = runner.invoke(app, ["components", "inspect", str(folder)])
    assert result.exit_code == 1
    assert dropped in result.output and "bogus.weight" in result.output


def test_inspect_unrecognised_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    result = runner.invoke(app, ["components", "inspect", str(tmp_path)])
    assert result.exit_code == 1 and "not a recognised checkpoint" in result.output
