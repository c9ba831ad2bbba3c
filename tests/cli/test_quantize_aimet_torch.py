"""`neodragon quantize --backend aimet-torch`. aimet-torch needs the standard (CUDA) torch build, so the
command runs in a second environment, `.venv-aimet-torch` in the repository root (created by SETUP;
the slow test skips, naming it, where it is missing), on a tiny random pipeline with QuickSRNet
exported here: it exits 0, quantize.json names the backend, every quantized graph loads in this
environment's ONNX Runtime and is within a stated SQNR of its float graph on held-out inputs,
AdaRound moved weight roundings of the graph it was asked for (and only there), and the quantized
graphs load on the QNN HTP backend with CPU fallback disabled. The checks made before any work (no
recorded source model, a changed one, mask fills in the module) run here, without aimet-torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from neodragon_cli.app import app
from neodragon_cli.atomic import write_json
from neodragon_cli.errors import UsageError
from test_generate import tiny_model  # noqa: F401 (fixture: tiny T5 + 1-block MMDiT + small causal VAE)
from test_quantize_cli import sr_export  # noqa: F401 (fixture: an export without a source model)

runner = CliRunner()
ENV = Path(__file__).resolve().parents[2] / ".venv-aimet-torch"
SETUP = 'python -m venv .venv-aimet-torch && .venv-aimet-torch/bin/python -m pip install torch==2.14.1 -e ".[aimet-torch,test]"'
needs_env = pytest.mark.skipif(not (ENV / "bin" / "neodragon").is_file(),
                               reason=f"no aimet-torch environment; in the repository root run: {SETUP}")  # fmt: skip
ADAROUND_ITERATIONS = 20
# SQNR floors (dB) vs the float graph on held-out inputs, a few dB under what both AIMET backends
# measure on these random tiny weights with one calibration video (aimet-torch / aimet-onnx: 17.7 /
# 17.7 for the w8a8 mmdit_context, 18.1 / 18.1 for decoder_first, fed one calibration input).
FLOORS = {"mmdit_context": 14.0, "mmdit_stage2": 22.0, "decoder_first": 14.0, "decoder_step": 20.0, "sr": 26.0}
SCHEMES = {"t5": "fp16", "mmdit_context": "w8a8", "mmdit_stage0": "fp16", "mmdit_stage1": "fp16", "mmdit_stage2": "w8a16",
           "decoder_first": "w8a16", "decoder_step": "w8a16", "sr": "w8a16"}  # fmt: skip
QNN_GRAPHS = ("mmdit_context", "decoder_first", "sr")  # decoder_step takes the HTP simulator over a minute


@pytest.fixture(scope="module")
def sr_pipeline_export(tiny_model, tmp_path_factory):  # noqa: F811
    """The tiny pipeline with a QuickSRNet-Small (folder `with-sr` beside it), exported at 64x64, 9 frames,
    without vae_encoder (the slow test quantizes everything else)."""
    import torch

    from neodragon_cli.pipelines.models.quicksrnet import QuickSRNetSmall

    root = tmp_path_factory.mktemp("aimet-torch")
    model = root / "with-sr"
    shutil.copytree(tiny_model, model)
    torch.manual_seed(0)
    QuickSRNetSmall().save_pretrained(model / "sr")
    spec = json.loads((model / "pipeline.json").read_text())
    spec["components"]["sr"] = {"component": "sr/quicksrnet-small", "path": "sr"}
    write_json(model / "pipeline.json", spec)
    export = root / "exported"
    result = runner.invoke(app, ["export", str(model), "-o", str(export), "--height", "64", "--width", "64", "--frames", "9",
                                 "--components", "text,mmdit,decoder,sr"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return export


def conv_roundings_moved(float_path: Path, quant_path: Path) -> list[float]:
    """Per Conv, the fraction of weights whose integer in the QDQ graph differs from round(w / scale)
    of the float graph's weight (0 for plain min-max rounding; AdaRound moves some)."""
    import onnx
    from onnx import numpy_helper

    def convs(path):
        model = onnx.load(str(path))
        constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        producer = {o: n for n in model.graph.node for o in n.output}
        weights = []
        for node in (n for n in model.graph.node if n.op_type == "Conv"):
            name = node.input[1]
            if name in constants:
                weights.append((constants[name], None))
            else:  # weight -> QuantizeLinear -> DequantizeLinear -> Conv
                quantize = producer[producer[name].input[0]]
                weights.append((constants[quantize.input[0]], constants[quantize.input[1]]))
        return weights

    moved = []
    for (weight, _), (rounded, scale) in zip(convs(float_path), convs(quant_path), strict=True):
        scale = scale.reshape(-1, *[1] * (weight.ndim - 1)) if scale.ndim else scale
        moved.append(float(np.mean(np.round(rounded / scale) != np.round(weight / scale))))
    return moved


@pytest.mark.slow
@needs_env
def test_aimet_torch_quantizes_in_its_environment_and_the_graphs_run_in_onnx_runtime(sr_pipeline_export, tmp_path, one_thread):
    from neodragon_cli.pipelines.deploy import onnx_tools, qnn
    from neodragon_cli.pipelines.deploy.calibration import load_recording, pick
    from neodragon_cli.pipelines.deploy.quantize import compare_graphs

    export, out, data = sr_pipeline_export, tmp_path / "quantized", tmp_path / "calibration"
    command = [str(ENV / "bin" / "neodragon"), "quantize", str(export), "-o", str(out), "--backend", "aimet-torch",
               "--videos", "1", "--calibration", "8", "--heldout-samples", "4", "--adaround-iterations", str(ADAROUND_ITERATIONS),
               "--per-module", "fp16=mmdit_stage0,mmdit_stage1", "--per-module", "w8a8=mmdit_context", "--no-qnn",
               "--save-calibration", str(data)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"sr: w8a16 on 8 recorded inputs + AdaRound ({ADAROUND_ITERATIONS} iterations)" in done.stderr  # the console is stderr

    report = json.loads((out / "quantize.json").read_text())
    assert report["backend"] == "aimet-torch"
    assert {name: entry["scheme"] for name, entry in report["graphs"].items()} == SCHEMES
    assert report["end_to_end"]["psnr_db"] >= 20, report["end_to_end"]
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
    manifest = json.loads((export / "export.json").read_text())
    heldout, _ = load_recording(data / "heldout")
    for name, floor in FLOORS.items():
        entry = report["graphs"][name]
        assert entry["backend"] == "aimet-torch" and entry["qdq_nodes"] > 0 and entry["opset"] == 21, (name, entry)
        assert json.loads((out / f"{name}.encodings").read_text())["param_encodings"], name
        session = onnx_tools.session(out / f"{name}.onnx", 1)  # this environment's ONNX Runtime, CPU EP
        assert [i.name for i in session.get_inputs()] == [i["name"] for i in manifest["graphs"][name]["inputs"]]
        measured = compare_graphs(export / f"{name}.onnx", out / f"{name}.onnx", pick(heldout.feeds[name], 4))  # as quantize picks
        assert measured["sqnr_db"] >= floor, (name, measured)
        assert abs(measured["sqnr_db"] - entry["sqnr_db"]) < 0.5, (name, measured["sqnr_db"], entry["sqnr_db"])

    assert report["graphs"]["sr"]["adaround"] == {"iterations": ADAROUND_ITERATIONS}
    assert max(conv_roundings_moved(export / "sr.onnx", out / "sr.onnx")) > 0  # AdaRound chose other roundings
    assert report["graphs"]["decoder_step"]["adaround"] is None
    assert max(conv_roundings_moved(export / "decoder_step.onnx", out / "decoder_step.onnx")) == 0  # nearest rounding

    qnn.register()
    for name in QNN_GRAPHS:
        check = qnn.htp_check(out / f"{name}.onnx", heldout.feeds[name][:1], threads=1).as_dict()
        # HTP's integer arithmetic departs from the CPU EP's QDQ simulation by less than quantization
        # departs from float (w8a8: both AIMET backends' mmdit_context 15.9 dB vs CPU, 17.7 vs float)
        assert check["loaded"] and check["sqnr_vs_cpu_db"] >= report["graphs"][name]["sqnr_db"] - 3, (name, check)


# ------------------------------------------------------------------------------------ before any work (no aimet-torch needed)


def test_an_export_without_a_recorded_source_model_is_refused(sr_export):  # noqa: F811
    from neodragon_cli.pipelines.deploy.export import MANIFEST
    from neodragon_cli.pipelines.deploy.quantize_aimet_torch import rebuild_modules

    export, _ = sr_export
    manifest = json.loads((export / MANIFEST).read_text())
    with pytest.raises(UsageError, match="records no source model"):
        rebuild_modules(export, manifest, ["sr"])


def test_a_source_model_changed_or_gone_since_the_export_is_refused(tmp_path):
    import torch

    from neodragon_cli.artifacts import ArtifactWriter
    from neodragon_cli.pipelines.deploy.quantize_aimet_torch import export_source

    model = tmp_path / "model"
    model.mkdir()
    (model / "pipeline.json").write_text("{}")
    with ArtifactWriter(tmp_path / "exported", command="export", parent=model) as art:
        torch.save({}, art.path / "placeholder.pt")
        art.record("export")
    assert export_source(tmp_path / "exported") == model
    (model / "pipeline.json").write_text('{"changed": true}')
    with pytest.raises(UsageError, match="changed since the export"):
        export_source(tmp_path / "exported")
    shutil.rmtree(model)
    with pytest.raises(UsageError, match="is not there"):
        export_source(tmp_path / "exported")


def test_a_graph_whose_module_computes_mask_fills_is_refused():
    from neodragon_cli.pipelines.deploy.quantize_aimet_torch import check_mask_constants

    manifest = {"graphs": {"t5": {"mask_constants_rewritten": [{"constant": "c", "values": 1, "was": -3.4e38}]},
                           "sr": {"mask_constants_rewritten": []}}}  # fmt: skip
    check_mask_constants(manifest, ["sr"])
    with pytest.raises(UsageError, match="cannot quantize t5: its PyTorch module computes mask fills"):
        check_mask_constants(manifest, ["t5", "sr"])


def test_the_recorder_feeds_the_encoder_frames_of_its_own_size_when_the_export_upscales(sr_pipeline_export, tmp_path):  # noqa: F811
    """With an sr graph the generated frames are twice the video size; the first-frame encoder takes the
    video size, so its calibration feeds are the decoder's frames before SR (the sr graph's inputs)."""
    from neodragon_cli.pipelines.deploy.calibration import record_graph_inputs

    model = sr_pipeline_export.parent / "with-sr"
    export = tmp_path / "exported"
    result = runner.invoke(app, ["export", str(model), "-o", str(export), "--height", "64", "--width", "64", "--frames", "9",
                                 "--components", "text,mmdit,vae_encoder,decoder,sr"])  # fmt: skip
    assert result.exit_code == 0, result.output
    recording = record_graph_inputs(export, ["a red circle moving left"], graphs=["vae_encoder", "sr"])
    assert recording.videos[0].shape[1:3] == (128, 128)
    encoder = recording.feeds["vae_encoder"]
    assert len(encoder) == 9 and all(feed["video"].shape == (1, 3, 1, 64, 64) for feed in encoder)
    assert -1.0 <= min(f["video"].min() for f in encoder) and max(f["video"].max() for f in encoder) <= 1.0
