"""`neodragon verify` and `neodragon convert` on the embedded model and on copies of it."""

import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from neodragon_cli.app import app
from neodragon_cli.artifacts import applied_operations, embedded_models_root, read_state

runner = CliRunner()
EMBEDDED = "shapes-teacher"


def test_embedded_model_verifies():
    result = runner.invoke(app, ["verify", EMBEDDED])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"ok: {EMBEDDED}") and "convert" in result.output


def test_one_changed_byte_fails_with_one_line(tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(embedded_models_root() / EMBEDDED, copy)
    weights = sorted(copy.rglob("*.safetensors"))[0]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    result = runner.invoke(app, ["verify", str(copy)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and weights.name in lines[0] and "does not match" in lines[0]


def test_verify_json_and_unknown_name(tmp_path):
    result = runner.invoke(app, ["verify", EMBEDDED, "--json", str(tmp_path / "v.json")])
    assert result.exit_code == 0 and '"ok": true' in (tmp_path / "v.json").read_text()
    result = runner.invoke(app, ["verify", "no-such-model"])
    assert result.exit_code == 2 and "no embedded model" in result.output


def test_convert_records_the_operation_and_verifies(tmp_path):
    out = tmp_path / "fp32"
    result = runner.invoke(app, ["convert", EMBEDDED, "-o", str(out), "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    assert applied_operations(out)[-2:] == ["convert", "convert"]
    op = read_state(out)["operations"][-1]
    assert op["results"]["dtype"] == "fp32" and op["results"]["tensors_cast"] > 0
    assert 1.99 < op["results"]["bytes_after"] / op["results"]["bytes_before"] <= 2  # the embedded copy is fp16
    source = load_file(str(embedded_models_root() / EMBEDDED / "mmdit" / "diffusion_pytorch_model.safetensors"))
    converted = load_file(str(out / "mmdit" / "diffusion_pytorch_model.safetensors"))
    assert all(converted[k].dtype == torch.float32 and torch.equal(converted[k].half(), v) for k, v in source.items())
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0


@pytest.mark.parametrize("args, message", [
    (["--dtype", "int8"], "unknown dtype"),
    (["--dtype", "fp16", "-o", "FILE/sub"], "is a file"),
])
def test_convert_bad_inputs_exit_2_and_write_nothing(tmp_path, args, message):
    (tmp_path / "FILE").write_text("x")
    argv = ["convert", EMBEDDED, *[a.replace("FILE", str(tmp_path / "FILE")) for a in args]]
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "out")]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2 and message in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]
