"""The compute model reproduces the paper's figures (2t/(t+1), 32x, 2.81x, ~90x); the schedule's token
counts are the reference pipeline's; FLOP counts of the 2-block twin equal the full model's; ONNX graph
FLOPs match the closed form."""

from __future__ import annotations

import pytest
import torch
from neodragon_cli.pipelines.deploy import analytic
from neodragon_cli.pipelines.flow.settings import SamplingConfig


@pytest.mark.parametrize("t", [1, 2, 7, 16, 100])
def test_causal_speedup_is_2t_over_t_plus_1(t):
    assert analytic.causal_speedup(t) == pytest.approx(2 * t / (t + 1))
    assert analytic.bidirectional_dot_products(t, 40) / analytic.causal_dot_products(t, 40) == pytest.approx(2 * t / (t + 1))


def test_paper_figures_32x_2_81x_and_90x():
    figures = analytic.paper_figures(7)
    assert figures["history_compression_k"] == 16  # 1/4 side at the coarsest of 3 stages
    assert figures["pyramidal_causal_speedup_limit"] == 32
    assert analytic.pyramidal_causal_speedup(10**7) == pytest.approx(32, rel=1e-5)  # the long-video limit is reached
    assert round(figures["spatial_pyramid_factor"], 2) == 2.81
    assert round(figures["combined_speedup_limit"]) == 90
    assert figures["combined_speedup_limit"] == pytest.approx(32 * 3 / (1 + 1 / 16 + 1 / 256))
    # finite videos get less: 7 latent frames
    assert figures["causal_speedup"] == pytest.approx(1.75)
    assert 1.75 < figures["pyramidal_causal_speedup"] < 32
    # a pyramid without compression (k = 1) is plain causal generation
    assert analytic.pyramidal_causal_speedup(7, k=1) == pytest.approx(analytic.causal_speedup(7))


def test_schedule_tokens_match_the_reference_pipeline():
    """Neodragon 320x512, 49 frames: image tokens per (unit, stage) as the official pipeline's table."""
    calls = analytic.schedule_calls(SamplingConfig(first_steps=(1, 1, 1), video_steps=(1, 1, 1), guidance=0.0, video_guidance=0.0),
                                    latent_frames=7, latent_size=(40, 64), patch_size=2, text_tokens=128, hybrid=True)  # fmt: skip
    tokens = {(c.unit, c.stage): sum(c.frame_tokens) for c in calls}
    assert [tokens[(1, s)] for s in range(3)] == [80, 320, 1280]
    assert [tokens[(6, s)] for s in range(3)] == [280, 520, 1600]
    assert len(calls) == 18 and all(c.batch == 1 for c in calls)
    assert calls[-1].tokens == 1728  # with the text


def test_one_frame_call_is_dense_attention():
    call = analytic.DiTCall(0, 2, 1, 1, (640,), 0, ((40, 64),))
    assert call.dot_products() == 640**2


def test_two_block_twin_counts_the_full_model(one_thread):
    from neodragon_cli.pipelines.models.base import parameters_on_meta
    from neodragon_cli.pipelines.models.mmdit import PyramidFlowMMDiT

    config = dict(sample_size=16, num_layers=5, attention_head_dim=16, num_attention_heads=2, caption_projection_dim=32,
                  pooled_projection_dim=8, pos_embed_max_size=16, joint_attention_dim=24)  # fmt: skip
    with parameters_on_meta(), torch.device("meta"):
        model = PyramidFlowMMDiT(**config).eval()
    call = analytic.schedule_calls(SamplingConfig(), latent_frames=3, latent_size=(16, 16), patch_size=2, text_tokens=6, hybrid=False)[-1]
    with torch.device("meta"):
        kwargs = dict(sample=[[torch.empty(1, 16, 1, h, w) for h, w in call.frame_sizes]], encoder_hidden_states=torch.empty(1, 6, 24),
                      encoder_attention_mask=None, pooled_projections=torch.empty(1, 8), timestep_ratio=torch.tensor([500.0]))  # fmt: skip
    full, full_attention, *_ = analytic.count_flops(lambda: model(**kwargs))
    twin, depth = analytic.two_block_twin(model)
    assert depth == 5 and len(twin.transformer_blocks) == 2
    assert analytic.mmdit_call_flops(twin, depth, call) == pytest.approx((full, full_attention))
    assert full_attention > 0


def test_onnx_graph_flops(tmp_path):
    from neodragon_cli.pipelines.deploy import onnx_tools

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10))
    onnx_tools.export_module(model.eval(), {"x": torch.randn(1, 3, 4, 4)}, ["y"], tmp_path / "m.onnx", 17)
    conv = 2 * (8 * 4 * 4) * (3 * 3 * 3)
    linear = 2 * 10 * 128
    assert analytic.onnx_graph_flops(tmp_path / "m.onnx") == conv + linear


def test_predicted_times_use_one_fitted_rate():
    result = analytic.predict_times({"a": 2e9, "b": 1e9}, {"a": 100.0, "b": 100.0})
    assert result["gflops_per_s"] == pytest.approx(15.0)  # 3 GFLOP in 0.2 s
    assert result["modules"]["a"]["measured_over_predicted"] == pytest.approx(100 / (2e9 / 15e9 * 1e3))
    assert analytic.predict_times({"a": 1.0}, {}) == {"gflops_per_s": None, "modules": {}}


def test_unknown_real_size_is_a_usage_error():
    from neodragon_cli.errors import UsageError

    with pytest.raises(UsageError, match="real:neodragon"):
        analytic.real_size_components("real:sd3")
