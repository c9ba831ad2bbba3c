"""Our MMDiT against the fixtures saved by the reference implementations (Pyramid-Flow and Neodragon).

Checkpoints are loaded through the registry's auto-detection, exactly as a user would load them.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

import neodragon_cli
from neodragon_cli.pipelines.models.mmdit import (
    NeodragonMMDiT,
    PyramidFlowMMDiT,
    joint_attention_mask,
    sincos_2d_table,
)

pytestmark = pytest.mark.golden

PF_CASES = [
    "a_first_frame",
    "a_first_frame_stage0_grid",
    "b_top_stage_history",
    "c_stage0_history",
    "c_stage1_history",
    "d_multi_column_training",
    "e_single_clip_3frames",
]
PF_TOL = dict(atol=2e-4, rtol=1e-4)  # pyramid_flow/mmdit/README.md
ND_TOL = dict(atol=1e-4, rtol=1e-4)  # neodragon/mmdit/README.md


@pytest.fixture
def pf(golden_dir):
    folder = golden_dir / "pyramid_flow" / "mmdit"
    meta = json.loads((folder / "case.json").read_text())
    return neodragon_cli.load_component("mmdit", folder / "checkpoint"), meta, load_file(str(folder / "case.safetensors"))


@pytest.fixture
def nd(golden_dir):
    folder = golden_dir / "neodragon" / "mmdit"
    return neodragon_cli.load_component("mmdit", folder / "diffusion_transformer_320p"), load_file(str(folder / "case.safetensors"))


def _pf_inputs(case, tensors):
    spec = case["inputs"]
    return dict(
        sample=[[tensors[k] for k in column] for column in spec["sample"]],
        encoder_hidden_states=tensors[spec["encoder_hidden_states"]],
        encoder_attention_mask=tensors[spec["encoder_attention_mask"]],
        pooled_projections=tensors[spec["pooled_projections"]],
        timestep_ratio=tensors[spec["timestep_ratio"]],
    )


def _record_block_outputs(model, index):
    """Hook collecting (video, text) outputs of block `index`, one entry per column call."""
    seen = []
    handle = model.transformer_blocks[index].register_forward_hook(lambda mod, args, out: seen.append(out))
    return seen, handle


def test_detection_picks_the_published_class(pf, nd):
    assert type(pf[0]) is PyramidFlowMMDiT
    assert type(nd[0]) is NeodragonMMDiT
    assert not hasattr(nd[0], "context_embedder")


def test_pf_parameter_count_and_position_table(pf):
    model, meta, _ = pf
    assert sum(p.numel() for p in model.parameters()) == meta["checkpoint"]["num_params"]
    cfg = meta["checkpoint"]["config"]
    # the stored buffer was built by the reference; ours is recomputed from the config
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    table = sincos_2d_table(dim, cfg["pos_embed_max_size"], cfg["sample_size"] // cfg["patch_size"])
    torch.testing.assert_close(table[None], model.pos_embed.pos_embed, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", PF_CASES)
def test_pf_case_outputs(pf, name):
    model, meta, tensors = pf
    case = meta["cases"][name]
    with torch.no_grad():
        out = model(**_pf_inputs(case, tensors))
    assert len(out) == len(case["outputs"])
    for got, key in zip(out, case["outputs"]):
        torch.testing.assert_close(got, tensors[key], **PF_TOL)


@pytest.mark.parametrize("name", ["b_top_stage_history", "c_stage1_history", "d_multi_column_training"])
def test_pf_case_intermediates(pf, name):
    model, meta, tensors = pf
    case = meta["cases"][name]
    debug = case["debug"]
    inputs = _pf_inputs(case, tensors)
    columns = len(inputs["sample"])
    seen, handle = _record_block_outputs(model, 0)
    try:
        with torch.no_grad():
            temb = model.time_text_embed(inputs["timestep_ratio"], inputs["pooled_projections"])
            text = model.context_embedder(inputs["encoder_hidden_states"])
            model(**inputs)
            embedded = [model.pos_embed(clips) for clips in inputs["sample"]]
    finally:
        handle.remove()
    torch.testing.assert_close(temb, tensors[debug["temb"]], **PF_TOL)
    torch.testing.assert_close(text, tensors[debug["context_embedder"]], **PF_TOL)
    valid = inputs["encoder_attention_mask"].bool()
    for s, (tokens, frame_sizes) in enumerate(embedded):
        torch.testing.assert_close(tokens, tensors[debug[f"patch_embed.{s}"]], **PF_TOL)
        frame_ids = torch.cat([torch.full((n,), float(f)) for f, n in enumerate(frame_sizes)])
        assert torch.equal(frame_ids.expand(tokens.shape[0], -1)[..., None], tensors[debug[f"frame_ids.{s}"]])
        mask = joint_attention_mask(valid[s::columns], frame_sizes, causal=True)
        assert torch.equal(mask, tensors[debug[f"attention_mask.{s}"]])
    # block 0 ran once per column: video outputs concatenate, text rows interleave back
    video = torch.cat([x for x, _ in seen], dim=1)
    text_out = torch.stack([c for _, c in seen], dim=1).flatten(0, 1)
    torch.testing.assert_close(video, tensors[debug["block0.hidden_states"]], **PF_TOL)
    torch.testing.assert_close(text_out, tensors[debug["block0.encoder_hidden_states"]], **PF_TOL)


def _nd_clips(tensors, prefix):
    history = [tensors[f"{prefix}history{i}"] for i in range(3) if f"{prefix}history{i}" in tensors]
    return history + [tensors[f"{prefix}sample"]]


@pytest.mark.parametrize("call", ["first_frame", "later_unit"])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_nd_stage_outputs(nd, call, stage):
    model, tensors = nd
    prefix = f"{call}/stage{stage}/"
    with torch.no_grad():
        out = model(
            sample=[_nd_clips(tensors, prefix)],
            encoder_hidden_states=tensors["inputs/encoder_hidden_states"],
            encoder_attention_mask=tensors["inputs/encoder_attention_mask"],
            pooled_projections=tensors["inputs/pooled_projections"],
            timestep_ratio=tensors[prefix + "timestep"],
        )
    torch.testing.assert_close(out[0], tensors[prefix + "output"], **ND_TOL)


def test_nd_cfg_batch2(nd):
    model, tensors = nd
    p = "cfg_batch2/"
    with torch.no_grad():
        out = model(
            sample=[_nd_clips(tensors, p)],
            encoder_hidden_states=tensors[p + "encoder_hidden_states"],
            encoder_attention_mask=tensors[p + "encoder_attention_mask"],
            pooled_projections=tensors[p + "pooled_projections"],
            timestep_ratio=tensors[p + "timestep"],
        )
    torch.testing.assert_close(out[0], tensors[p + "output"], **ND_TOL)


@pytest.mark.parametrize("call", ["first_frame", "later_unit"])
def test_nd_intermediates(nd, call):
    model, tensors = nd
    prefix, debug = f"{call}/stage2/", f"{call}/stage2/debug/"
    clips = _nd_clips(tensors, prefix)
    valid = tensors["inputs/encoder_attention_mask"].bool()
    hooks = [_record_block_outputs(model, i) for i in range(len(model.transformer_blocks))]
    try:
        with torch.no_grad():
            temb = model.time_text_embed(tensors[prefix + "timestep"], tensors["inputs/pooled_projections"])
            model(
                sample=[clips],
                encoder_hidden_states=tensors["inputs/encoder_hidden_states"],
                encoder_attention_mask=valid,
                pooled_projections=tensors["inputs/pooled_projections"],
                timestep_ratio=tensors[prefix + "timestep"],
            )
            tokens, frame_sizes = model.pos_embed(clips)
    finally:
        for _, handle in hooks:
            handle.remove()
    torch.testing.assert_close(temb, tensors[debug + "temb"], **ND_TOL)
    torch.testing.assert_close(tokens, tensors[debug + "patch_embed"], **ND_TOL)
    assert torch.equal(joint_attention_mask(valid, frame_sizes), tensors[debug + "attention_mask"].bool())
    for i, (seen, _) in enumerate(hooks):
        (video, text), = seen
        torch.testing.assert_close(video, tensors[debug + f"block{i}.hidden_states"], **ND_TOL)
        if text is not None:
            torch.testing.assert_close(text, tensors[debug + f"block{i}.encoder_hidden_states"], **ND_TOL)
        else:
            assert debug + f"block{i}.encoder_hidden_states" not in tensors  # last block: context pre-only
