"""quantize: W8A16 of each tiny exported component reaches a stated SQNR floor on held-out inputs
(aimet-onnx and ONNX Runtime's QNN tools), AdaRound raises SQNR over plain PTQ on a small conv net,
a quantized MMDiT stage graph runs on the QNN HTP backend (simulator) with CPU fallback disabled, an
op HTP lacks is named, and the per-module plan follows the paper's defaults."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neodragon_cli.errors import UsageError
from neodragon_cli.pipelines.deploy import onnx_tools, qnn
from neodragon_cli.pipelines.deploy.calibration import pick
from neodragon_cli.pipelines.deploy.export import decoder_graphs, mmdit_graphs, module_graph, write_graphs
from neodragon_cli.pipelines.deploy.quantize import aimet_quantize, compare_graphs, ort_quantize, plan_quantization
from test_export_graphs import LATENTS, SIZE, every_history_call, tiny_mmdit

GRAPHS = ["t5", "clip_0", "context_adapter", "mmdit_stage0", "mmdit_stage1", "mmdit_stage2", "vae_encoder",
          "decoder_first", "decoder_step", "sr"]  # fmt: skip


def feeds(spec) -> list[dict[str, np.ndarray]]:
    return [{k: v.numpy() for k, v in case.items()} for case in spec.cases]


def quantized_sqnr(tmp_path, spec, calibration, heldout, *, backend="aimet", scheme="w8a16", adaround=0) -> float:
    (tmp_path / "float").mkdir(exist_ok=True)
    write_graphs([spec], tmp_path / "float")
    float_path, target = tmp_path / "float" / f"{spec.name}.onnx", tmp_path / f"{spec.name}_{backend}_{adaround}.onnx"
    if backend == "ort":
        model, encodings = ort_quantize(float_path, calibration, scheme)
    else:
        model, encodings = aimet_quantize(float_path, calibration, scheme, adaround_iterations=adaround)
    assert encodings["param_encodings"] and encodings["activation_encodings"]
    onnx_tools.save(model, target)
    return compare_graphs(float_path, target, heldout)["sqnr_db"]


# ------------------------------------------------------------------------------------ plan


def test_paper_defaults_text_and_adapter_fp16_the_rest_w8a16_adaround_on_sr():
    plan = plan_quantization(GRAPHS)
    schemes = {g.name: g.scheme for g in plan.graphs}
    assert {g for g, s in schemes.items() if s == "fp16"} == {"t5", "clip_0", "context_adapter"}
    assert {g.name for g in plan.graphs if g.adaround} == {"sr"}
    sizes = {g.name: g.calibration for g in plan.graphs}
    assert sizes["mmdit_stage1"] == 300 and sizes["decoder_step"] == 50 and sizes["vae_encoder"] == 50 and sizes["sr"] == 500


def test_per_module_schemes_groups_patterns_and_calibration_size():
    plan = plan_quantization(GRAPHS, scheme="w8a8", per_module=["w8a16=mmdit", "fp16=decoder_step", "w8a16=t5"],
                             adaround="none", calibration=7)  # fmt: skip
    schemes = {g.name: g.scheme for g in plan.graphs}
    assert schemes["mmdit_stage2"] == "w8a16" and schemes["decoder_step"] == "fp16" and schemes["t5"] == "w8a16"
    assert schemes["vae_encoder"] == "w8a8" and schemes["clip_0"] == "fp16"
    assert not any(g.adaround for g in plan.graphs) and {g.calibration for g in plan.graphs} == {7}
    assert [g.name for g in plan_quantization(GRAPHS, adaround="mmdit_stage*").graphs if g.adaround] == ["mmdit_stage0", "mmdit_stage1", "mmdit_stage2"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scheme": "w4a16"}, "unknown scheme 'w4a16'"),
        ({"per_module": ["int4=mmdit"]}, "unknown scheme 'int4'"),
        ({"per_module": ["w8a16=unet"]}, "'unet' names no graph"),
        ({"per_module": ["mmdit"]}, "is not SCHEME=MODULES"),
        ({"adaround": "sr", "backend": "ort"}, "--adaround needs an AIMET backend"),
        ({"adaround": "t5"}, "t5 is fp16"),
        ({"backend": "tflite"}, "unknown backend"),
        ({"calibration": 0}, "--calibration must be at least 1"),
    ],
)
def test_bad_plans_are_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message):
        plan_quantization(GRAPHS, **kwargs)


def test_ort_backend_notes_that_it_leaves_the_default_adaround_out():
    plan = plan_quantization(GRAPHS, backend="ort")
    assert not any(g.adaround for g in plan.graphs) and "AdaRound" in plan.notes[0]


def test_pick_spreads_over_the_run():
    assert pick(list(range(10)), 3) == [0, 4, 9] and pick([1, 2], 5) == [1, 2]


# ------------------------------------------------------------------------------------ SQNR floors

# floors (dB) at W8A16 on held-out inputs for random-weight tiny components (the paper's Table 9
# has 22-29 dB for the MMDiT stages, 35-48 for the VAE and QuickSRNet); measured here: tiny MMDiT
# stage 2 26.9 dB (aimet), tiny causal-VAE decoder step 24.0 dB on 4 calibration latents
FLOORS = {"mmdit_stage2": 22.0, "decoder_step": 20.0, "vae_encoder": 30.0, "sr": 35.0}


@pytest.mark.parametrize("backend", ["aimet", "ort"])
def test_w8a16_mmdit_stage_graph_reaches_its_floor(tmp_path, one_thread, backend):
    model = tiny_mmdit(context_embedder=False)
    stage = [s for s in mmdit_graphs(model, (SIZE, SIZE), LATENTS, every_history_call(model)) if s.name == "mmdit_stage2"][0]
    heldout = [s for s in mmdit_graphs(model, (SIZE, SIZE), LATENTS, every_history_call(model)) if s.name == "mmdit_stage2"][0]
    sqnr = quantized_sqnr(tmp_path, stage, feeds(stage), feeds(heldout), backend=backend)
    assert sqnr >= FLOORS["mmdit_stage2"], sqnr


def tiny_vae():
    from neodragon_cli.pipelines.models.causal_vae import CausalVideoVAE

    torch.manual_seed(0)
    widths = dict(encoder_block_out_channels=(8, 8, 16, 16), decoder_block_out_channels=(8, 8, 16, 16))
    return CausalVideoVAE(encoder_layers_per_block=(1,) * 4, decoder_layers_per_block=(1,) * 4, encoder_norm_num_groups=2,
                          decoder_norm_num_groups=2, **widths).eval()  # fmt: skip


def test_w8a16_streaming_decoder_step_reaches_its_floor(tmp_path, one_thread):
    vae = tiny_vae()
    calibration = decoder_graphs(vae, list(torch.randn(1, 16, 5, 2, 2).split(1, dim=2)))[1]
    heldout = decoder_graphs(vae, list(torch.randn(1, 16, 4, 2, 2).split(1, dim=2)))[1]
    sqnr = quantized_sqnr(tmp_path, calibration, feeds(calibration), feeds(heldout))
    assert sqnr >= FLOORS["decoder_step"], sqnr


def test_w8a16_vae_encoder_reaches_its_floor(tmp_path, one_thread):
    from neodragon_cli.pipelines.deploy.graphs import FirstFrameEncoder

    encoder = FirstFrameEncoder(tiny_vae())
    frames = [torch.rand(1, 3, 1, 32, 32) * 2 - 1 for _ in range(8)]
    spec = module_graph("vae_encoder", "vae", encoder, {"video": frames[0]}, ["mean", "std"])
    sqnr = quantized_sqnr(tmp_path, spec, [{"video": f.numpy()} for f in frames[:5]], [{"video": f.numpy()} for f in frames[5:]])
    assert sqnr >= FLOORS["vae_encoder"], sqnr


def small_conv_net() -> torch.nn.Module:
    """A QuickSRNet-shaped 2x upscaler: conv, ReLU, conv to 3*4 channels, depth-to-space."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 12, 3, padding=1),
                               torch.nn.PixelShuffle(2)).eval()  # fmt: skip


def sr_feeds(count: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"x": torch.rand(1, 3, 12, 12, generator=generator).numpy()} for _ in range(count)]


def test_w8a16_sr_reaches_its_floor_and_adaround_raises_sqnr_over_plain_ptq(tmp_path, one_thread):
    spec = module_graph("sr", "sr", small_conv_net(), {"x": torch.from_numpy(sr_feeds(1, 0)[0]["x"])}, ["upscaled"])
    calibration, heldout = sr_feeds(12, 1), sr_feeds(12, 2)
    plain = quantized_sqnr(tmp_path, spec, calibration, heldout)
    rounded = quantized_sqnr(tmp_path, spec, calibration, heldout, adaround=100)
    assert plain >= FLOORS["sr"], plain
    assert rounded > plain + 0.5, (plain, rounded)


# ------------------------------------------------------------------------------------ QNN HTP


def test_quantized_mmdit_stage_graph_runs_on_qnn_htp_with_cpu_fallback_disabled(tmp_path, one_thread):
    model = tiny_mmdit(context_embedder=False)
    stage = [s for s in mmdit_graphs(model, (SIZE, SIZE), LATENTS, every_history_call(model)) if s.name == "mmdit_stage1"][0]
    write_graphs([stage], tmp_path)
    qdq, _ = aimet_quantize(tmp_path / "mmdit_stage1.onnx", feeds(stage), "w8a16")
    onnx_tools.save(qdq, tmp_path / "q.onnx")
    check = qnn.htp_check(tmp_path / "q.onnx", feeds(stage)[-1:], context_dir=tmp_path, htp_arch="79", soc_model="69")
    assert check.loaded and not check.unsupported, check
    assert check.sqnr_vs_cpu_db >= 30, check  # the HTP's integer kernels vs ONNX Runtime's QDQ simulation
    assert {"q_ctx.onnx"} <= set(check.context_files) and any(f.endswith(".bin") for f in check.context_files)


def graph_with_an_op_htp_lacks(path):
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu0"), helper.make_node("Det", ["r"], ["y"], name="the_det")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_an_op_htp_lacks_is_named(tmp_path):
    graph_with_an_op_htp_lacks(tmp_path / "g.onnx")
    check = qnn.htp_check(tmp_path / "g.onnx", [])
    assert not check.loaded and check.unsupported == [{"node": "the_det", "op": "Det"}]
