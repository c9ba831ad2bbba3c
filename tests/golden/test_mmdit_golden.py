"""Our MMDiT against the fixtures saved by the reference implementations (Pyramid-Flow and Neodragon).

Checkpoints are loaded through the registry's auto-detection, exactly as a user would load them.
Cases, call structure, shapes, block counts and tolerances are read from each fixture's case.json,
its case.safetensors and its checkpoint, so the tests hold for any fixture set the reference
generators produce.
"""

import json

import pytest
import torch
from golden_case import case, checkpoint_folder, params, tol
from safetensors.torch import load_file

import neodragon_cli
from neodragon_cli.pipelines.models.mmdit import joint_attention_mask, sincos_2d_table

pytestmark = pytest.mark.golden

PF = "pyramid_flow/mmdit"
ND = "neodragon/mmdit"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _pf_tolerances(meta):
    t = meta["tolerance"]
    # case.json gives outputs_atol/rtol and debug_atol; its README: "the same [rtol] for the debug tensors"
    return dict(atol=t["outputs_atol"], rtol=t["outputs_rtol"]), dict(atol=t["debug_atol"], rtol=t["outputs_rtol"])


@pytest.fixture
def pf(golden_dir):
    folder = golden_dir / PF
    meta, tensors = case(folder)
    return neodragon_cli.load_component("mmdit", folder / meta["checkpoint"]["dir"]), meta, tensors


def _nd_folder(golden_dir, meta):
    return checkpoint_folder(golden_dir / ND, meta["checkpoint"])


@pytest.fixture
def nd(golden_dir):
    meta, tensors = case(golden_dir / ND)
    return neodragon_cli.load_component("mmdit", _nd_folder(golden_dir, meta)), meta, tensors


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


def _pos_table_key(config, stored):
    """The stored sincos buffer: the checkpoint tensor of shape [1, pos_embed_max_size^2, inner_dim]."""
    shape = [1, config["pos_embed_max_size"] ** 2, config["num_attention_heads"] * config["attention_head_dim"]]
    (key,) = [k for k, v in stored.items() if list(v.shape) == shape and "pos_embed" in k]
    return key


def _check_checkpoint(model, folder, config, expected_params=None, debug_tol=None):
    """Every stored tensor is loaded with its shape, the block count and the text path follow the
    checkpoint, parameters count as recorded (or as stored, minus the sincos buffer), and our sincos
    table recomputed from the config equals the reference's stored buffer."""
    stored = load_file(str(folder / WEIGHTS))
    ours = model.state_dict()
    assert {k: list(v.shape) for k, v in ours.items()} == {k: list(v.shape) for k, v in stored.items()}
    assert len(model.transformer_blocks) == config["num_layers"]
    has_context_embedder = any(k.startswith("context_embedder.") for k in stored)
    assert (getattr(model, "context_embedder", None) is not None) == has_context_embedder
    table_key = _pos_table_key(config, stored)
    if expected_params is None:  # not recorded: the stored tensors minus the sincos buffer
        expected_params = sum(v.numel() for k, v in stored.items() if k != table_key)
    assert sum(p.numel() for p in model.parameters()) == expected_params
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    table = sincos_2d_table(dim, config["pos_embed_max_size"], config["sample_size"] // config["patch_size"])
    torch.testing.assert_close(table[None], stored[table_key], **debug_tol)


def test_pf_checkpoint_parameters_and_position_table(pf, golden_dir):
    model, meta, _ = pf
    ckpt = meta["checkpoint"]
    folder = golden_dir / PF / ckpt["dir"]
    assert len(load_file(str(folder / WEIGHTS))) == ckpt["num_tensors"]
    config = json.loads((folder / "config.json").read_text())
    _check_checkpoint(model, folder, config, ckpt["num_params"], _pf_tolerances(meta)[1])


def test_nd_checkpoint_parameters_and_position_table(nd, golden_dir):
    model, meta, _ = nd
    folder = _nd_folder(golden_dir, meta)
    config = json.loads((folder / "config.json").read_text())
    _check_checkpoint(model, folder, config, None, tol(meta["tolerance"]["debug"]))


@pytest.mark.parametrize("name", params(PF, lambda meta: list(meta["cases"])))
def test_pf_case_outputs(pf, name):
    model, meta, tensors = pf
    case = meta["cases"][name]
    with torch.no_grad():
        out = model(**_pf_inputs(case, tensors))
    assert len(out) == len(case["outputs"])
    assert [list(o.shape) for o in out] == case["output_shapes"]
    for got, key in zip(out, case["outputs"]):
        torch.testing.assert_close(got, tensors[key], **_pf_tolerances(meta)[0])


@pytest.mark.parametrize("name", params(PF, lambda meta: list(meta["cases"])))
def test_pf_case_intermediates(pf, golden_dir, name):
    """temb, projected text and frame ids for every case; patch tokens, the attention mask and block 0
    wherever the case recorded them."""
    model, meta, tensors = pf
    case = meta["cases"][name]
    debug = case["debug"]
    causal = json.loads((golden_dir / PF / meta["checkpoint"]["dir"] / "config.json").read_text())["use_temporal_causal"]
    debug_tol = _pf_tolerances(meta)[1]
    inputs = _pf_inputs(case, tensors)
    columns = len(inputs["sample"])
    with_blocks = "block0.hidden_states" in debug
    seen, handle = _record_block_outputs(model, 0)
    try:
        with torch.no_grad():
            temb = model.time_text_embed(inputs["timestep_ratio"], inputs["pooled_projections"])
            text = model.context_embedder(inputs["encoder_hidden_states"])
            if with_blocks:
                model(**inputs)
            embedded = [model.pos_embed(clips) for clips in inputs["sample"]]
    finally:
        handle.remove()
    torch.testing.assert_close(temb, tensors[debug["temb"]], **debug_tol)
    torch.testing.assert_close(text, tensors[debug["context_embedder"]], **debug_tol)
    valid = inputs["encoder_attention_mask"].bool()
    assert [tokens.shape[1] for tokens, _ in embedded] == case["hidden_length"]
    for s, (tokens, frame_sizes) in enumerate(embedded):
        frame_ids = torch.cat([torch.full((n,), float(f)) for f, n in enumerate(frame_sizes)])
        # integer frame positions: exact on any fixture set
        assert torch.equal(frame_ids.expand(tokens.shape[0], -1)[..., None], tensors[debug[f"frame_ids.{s}"]])
        if f"patch_embed.{s}" in debug:
            torch.testing.assert_close(tokens, tensors[debug[f"patch_embed.{s}"]], **debug_tol)
        if f"attention_mask.{s}" in debug:
            mask = joint_attention_mask(valid[s::columns], frame_sizes, causal=causal)
            assert torch.equal(mask, tensors[debug[f"attention_mask.{s}"]])
    if with_blocks:  # block 0 ran once per column: video outputs concatenate, text rows interleave back
        video = torch.cat([x for x, _ in seen], dim=1)
        text_out = torch.stack([c for _, c in seen], dim=1).flatten(0, 1)
        torch.testing.assert_close(video, tensors[debug["block0.hidden_states"]], **debug_tol)
        torch.testing.assert_close(text_out, tensors[debug["block0.encoder_hidden_states"]], **debug_tol)


def _nd_calls(meta):
    """(call, stage entry) for every per-stage call list in case_meta (first_frame, later_unit, ...)."""
    return [
        pytest.param(call, entry["stage"], id=f"{call}-stage{entry['stage']}")
        for call, entries in meta["case_meta"].items()
        if isinstance(entries, list) and entries and isinstance(entries[0], dict) and "stage" in entries[0]
        for entry in entries
    ]


def _nd_entry(meta, call, stage):
    (entry,) = [e for e in meta["case_meta"][call] if e["stage"] == stage]
    return entry


def _nd_clips(tensors, prefix, history_shapes):
    history = [tensors[f"{prefix}history{i}"] for i in range(len(history_shapes))]
    assert [list(h.shape) for h in history] == history_shapes
    return history + [tensors[f"{prefix}sample"]]


@pytest.mark.parametrize("call,stage", params(ND, _nd_calls, 2))
def test_nd_stage_outputs(nd, call, stage):
    model, meta, tensors = nd
    entry = _nd_entry(meta, call, stage)
    prefix = f"{call}/stage{stage}/"
    assert list(tensors[prefix + "sample"].shape) == entry["sample_shape"]
    assert tensors[prefix + "timestep"].tolist() == [entry["timestep"]] * len(tensors[prefix + "timestep"])
    with torch.no_grad():
        out = model(
            sample=[_nd_clips(tensors, prefix, entry.get("history_shapes", []))],
            encoder_hidden_states=tensors["inputs/encoder_hidden_states"],
            encoder_attention_mask=tensors["inputs/encoder_attention_mask"],
            pooled_projections=tensors["inputs/pooled_projections"],
            timestep_ratio=tensors[prefix + "timestep"],
        )
    torch.testing.assert_close(out[0], tensors[prefix + "output"], **tol(meta["tolerance"]["output"]))


def test_nd_cfg_batch2(nd):
    model, meta, tensors = nd
    p = "cfg_batch2/"
    with torch.no_grad():
        out = model(
            sample=[_nd_clips(tensors, p, meta["case_meta"]["cfg_batch2"]["history_shapes"])],
            encoder_hidden_states=tensors[p + "encoder_hidden_states"],
            encoder_attention_mask=tensors[p + "encoder_attention_mask"],
            pooled_projections=tensors[p + "pooled_projections"],
            timestep_ratio=tensors[p + "timestep"],
        )
    torch.testing.assert_close(out[0], tensors[p + "output"], **tol(meta["tolerance"]["output"]))


def _nd_debug_calls(meta):
    """(call, stage) wherever the fixture stored debug intermediates."""
    return [
        param for param in _nd_calls(meta)
        if f"{param.values[0]}/stage{param.values[1]}/debug/temb" in meta["tensors"]
    ]  # fmt: skip


@pytest.mark.parametrize("call,stage", params(ND, _nd_debug_calls, 2))
def test_nd_intermediates(nd, golden_dir, call, stage):
    model, meta, tensors = nd
    entry = _nd_entry(meta, call, stage)
    config = json.loads((_nd_folder(golden_dir, meta) / "config.json").read_text())
    debug_tol = tol(meta["tolerance"]["debug"])
    prefix = f"{call}/stage{stage}/"
    debug = prefix + "debug/"
    clips = _nd_clips(tensors, prefix, entry.get("history_shapes", []))
    valid = tensors["inputs/encoder_attention_mask"].bool()
    recorded_blocks = sorted(
        int(k[len(debug) + len("block"):].split(".")[0]) for k in tensors if k.startswith(debug + "block") and k.endswith(".hidden_states")
    )  # fmt: skip
    assert recorded_blocks == list(range(len(model.transformer_blocks)))
    hooks = [_record_block_outputs(model, i) for i in recorded_blocks]
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
    torch.testing.assert_close(temb, tensors[debug + "temb"], **debug_tol)
    torch.testing.assert_close(tokens, tensors[debug + "patch_embed"], **debug_tol)
    mask = joint_attention_mask(valid, frame_sizes, causal=config["use_temporal_causal"])
    assert torch.equal(mask, tensors[debug + "attention_mask"].bool())
    for i, (seen, _) in enumerate(hooks):
        (video, text), = seen
        torch.testing.assert_close(video, tensors[debug + f"block{i}.hidden_states"], **debug_tol)
        if text is not None:  # the forward cut the columns that are padding in every row (they reach no valid token)
            kept = text.shape[1]
            assert not valid[:, kept:].any()
            torch.testing.assert_close(text, tensors[debug + f"block{i}.encoder_hidden_states"][:, :kept], **debug_tol)
        else:  # a context_pre_only block returns no text; the reference stored none either
            assert debug + f"block{i}.encoder_hidden_states" not in tensors
