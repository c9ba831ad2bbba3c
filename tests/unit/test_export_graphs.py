"""Export graphs at tiny real-architecture configs: the padded stage graphs equal the unpadded MMDiT
for every history length of a 7-latent-frame video, in PyTorch and in ONNX Runtime; no graph holds a
mask constant below -1e4, a rank-6 tensor or a `Sin`; the T5 residual rescaling keeps outputs."""

from __future__ import annotations

import pytest
import torch

from neodragon_cli.pipelines.deploy import onnx_tools
from neodragon_cli.pipelines.deploy.export import GraphSpec, mmdit_graphs, write_graphs
from neodragon_cli.pipelines.deploy.graphs import max_t5_residual, rescale_t5_residuals
from neodragon_cli.pipelines.deploy.mmdit_stage import history_levels
from neodragon_cli.pipelines.flow.sampler import history_clips
from neodragon_cli.pipelines.flow.scheduler import latent_pyramid
from neodragon_cli.pipelines.models.mmdit import PyramidFlowMMDiT

LATENTS, SIZE, TEXT = 7, 16, 6


def tiny_mmdit(context_embedder: bool, interval: bool = False) -> PyramidFlowMMDiT:
    torch.manual_seed(0)
    model = PyramidFlowMMDiT(
        sample_size=16, num_layers=2, attention_head_dim=16, num_attention_heads=2, caption_projection_dim=32,
        pooled_projection_dim=8, pos_embed_max_size=16, joint_attention_dim=24, in_channels=4,
        use_context_embedder=context_embedder, interval_conditioning=interval,
    ).eval()  # fmt: skip
    for p in model.parameters():  # AdaLN-Zero starts as the identity: give every weight a value
        torch.nn.init.normal_(p, std=0.2)
    return model


def every_history_call(model: PyramidFlowMMDiT) -> list[tuple[dict, torch.Tensor]]:
    """One unpadded call per (stage, history length 0..6), with its PyTorch output (a Mean-Flows model
    gets a step end 150 below its timestep)."""
    video = torch.randn(1, 4, LATENTS, SIZE, SIZE)
    pyramid = latent_pyramid(video, 3)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    calls = []
    for stage in range(3):
        for end in range(LATENTS):
            side = SIZE >> (2 - stage)
            kwargs = dict(
                sample=[(history_clips(pyramid, stage, end) if end else []) + [torch.randn(1, 4, 1, side, side)]],
                encoder_hidden_states=torch.randn(1, TEXT, model.text_width), encoder_attention_mask=mask,
                pooled_projections=torch.randn(1, 8), timestep_ratio=torch.tensor([900.0 - 100 * stage]),
            )  # fmt: skip
            if model.interval_conditioning:
                kwargs["timestep_end"] = kwargs["timestep_ratio"] - 150.0
            with torch.no_grad():
                calls.append((kwargs, model(**kwargs)[0]))
    return calls


def test_history_levels_follow_the_sampler():
    assert history_levels(6, 0) == [6]
    assert history_levels(6, 2) == [4, 1, 1]
    assert history_levels(1, 2) == [0, 0, 1]
    assert history_levels(0, 1) == [0, 0]


@pytest.mark.parametrize("context_embedder", [True, False], ids=["pyramid-flow", "neodragon"])
def test_padded_stage_graphs_equal_the_unpadded_model_for_every_history_length(tmp_path, context_embedder):
    model = tiny_mmdit(context_embedder)
    specs = mmdit_graphs(model, (SIZE, SIZE), LATENTS, every_history_call(model))
    stages = [s for s in specs if s.name.startswith("mmdit_stage")]
    assert [len(s.cases) for s in stages] == [LATENTS] * 3
    for spec in stages:  # the torch form of the graph first
        for case, (reference,) in zip(spec.cases, spec.references):
            with torch.no_grad():
                assert onnx_tools.sqnr_db(reference, spec.module(*case.values())) >= 60
    entries = write_graphs(specs, tmp_path, min_sqnr_db=60)
    for name, entry in entries.items():
        for output in entry["validation"]["outputs"].values():
            assert output["sqnr_db"] >= 60, (name, output)
        facts = entry["graph"]
        assert facts["max_rank"] <= 5 and "Sin" not in facts["ops"] and "If" not in facts["ops"] and "Loop" not in facts["ops"]
        assert facts["min_constant"] is None or facts["min_constant"] >= -1e4
        assert not {"Shape", "Gather", "Mod", "Constant"} & set(facts["ops"]), facts["ops"]  # shape arithmetic folded
        assert entry["simplified"]["nodes_after"] < entry["simplified"]["nodes_before"] or name == "mmdit_context"
    stage2 = entries["mmdit_stage2"]
    shapes = {i["name"]: i["shape"] for i in stage2["inputs"]}
    assert shapes["history_0"] == [1, 4, 4, 4, 4] and shapes["latents"] == [1, 4, 1, 16, 16]
    assert shapes["rope_cos"] == [4 * 4 + 16 + 64 + 64, 1, 16]  # rank 3, padded video tokens
    assert ("mmdit_context" in entries) == context_embedder


def test_a_mean_flows_mmdit_exports_with_the_step_end_as_an_input(tmp_path):
    model = tiny_mmdit(False, interval=True)  # every weight random, the step-length embedding included
    calls = every_history_call(model)
    entries = write_graphs(mmdit_graphs(model, (SIZE, SIZE), LATENTS, calls), tmp_path, min_sqnr_db=60)
    for stage in range(3):
        entry = entries[f"mmdit_stage{stage}"]
        assert "interval_embedding" in [i["name"] for i in entry["inputs"]]
        assert min(o["sqnr_db"] for o in entry["validation"]["outputs"].values()) >= 60
    kwargs, output = calls[-1]  # the step's length matters, so the graph must be fed it
    with torch.no_grad():
        other = model(**{**kwargs, "timestep_end": kwargs["timestep_ratio"] - 600.0})[0]
    assert onnx_tools.sqnr_db(output, other) < 40


def test_validation_failure_is_reported_with_the_graph_name(tmp_path):
    linear = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    spec = GraphSpec("wrong", "mmdit", linear, ["y"], [{"x": x}], [[linear(x).detach() + 1.0]])
    with pytest.raises(Exception, match="graph wrong: output y"):
        write_graphs([spec], tmp_path)


def test_t5_residual_rescaling_keeps_outputs_and_shrinks_the_residual_stream(tmp_path):
    from neodragon_cli.pipelines.models.text_encoders import T5TextEncoder, t5_config

    torch.manual_seed(0)
    encoder = T5TextEncoder(t5_config(vocab_size=64, d_model=32, num_layers=2, num_heads=2, d_ff=64, dropout_rate=0.0)).eval()
    ids = torch.randint(0, 64, (1, 10))
    mask = torch.ones_like(ids)
    mask[:, -3:] = 0
    scaled = rescale_t5_residuals(encoder)
    with torch.no_grad():
        before, after = encoder(ids, attention_mask=mask), scaled(ids, attention_mask=mask)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert max_t5_residual(scaled, ids, mask) == pytest.approx(max_t5_residual(encoder, ids, mask) / 16, rel=1e-4)
    spec = GraphSpec("t5", "text_encoder", scaled, ["embeds"], [{"input_ids": ids, "attention_mask": mask}], [[before]])
    entry = write_graphs([spec], tmp_path)["t5"]
    assert entry["mask_constants_rewritten"], "the HF mask fill should have been found and rewritten"
    assert entry["graph"]["min_constant"] >= -1e4

