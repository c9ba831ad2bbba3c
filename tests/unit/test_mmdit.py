"""Pyramidal MMDiT: real sizes, checkpoint round trips and failures, blockwise attention, training init."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import neodragon_cli
from neodragon_cli.errors import CheckpointError, UsageError
from neodragon_cli.pipelines.flow.sampler import prediction_type
from neodragon_cli.pipelines.models.mmdit import (
    PRESETS,
    WEIGHTS_NAME,
    PyramidFlowMMDiT,
    joint_attention,
    joint_attention_mask,
    mmdit_from_preset,
)

TINY = dict(
    sample_size=32,
    in_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    caption_projection_dim=16,
    pooled_projection_dim=12,
    pos_embed_max_size=16,
    joint_attention_dim=20,
)
NEODRAGON = dict(TINY, use_context_embedder=False)


def _randomised(model, seed=0):
    """Every parameter random (the training init zeroes the modulations and the output)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def _inputs(model, text_width, batch=2, text_len=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    c = model.out_channels
    clips = [torch.randn(batch, c, 2, 4, 4, generator=gen), torch.randn(batch, c, 1, 8, 8, generator=gen)]
    mask = torch.ones(batch, text_len, dtype=torch.long)
    mask[0, 4:] = 0
    return dict(
        sample=[clips],
        encoder_hidden_states=torch.randn(batch, text_len, text_width, generator=gen),
        encoder_attention_mask=mask,
        pooled_projections=torch.randn(batch, model.config["pooled_projection_dim"], generator=gen),
        timestep_ratio=torch.tensor([900.0, 250.0][:batch]),
    )


# ---------------------------------------------------------------- real sizes


@pytest.mark.parametrize(
    "preset, params, block, last_block",
    [
        # published / computed-from-architecture counts (reference notes)
        ("pyramid-flow-sd3-2b", 2_028_334_144, 84_980_992, 54_294_784),
        ("neodragon-18", 1_512_155_200, 84_980_992, 54_294_784),
    ],
)
def test_real_sizes_on_meta(preset, params, block, last_block):
    with torch.device("meta"):
        model = mmdit_from_preset(preset)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model) == params
    assert count(model.transformer_blocks[0]) == block
    assert count(model.transformer_blocks[-1]) == last_block
    assert model.pos_embed.pos_embed.shape == (1, 192 * 192, 1536)  # 56,623,104-float buffer
    assert model.pos_embed.pos_embed.is_meta


def test_presets_and_unknown_preset():
    with torch.device("meta"):
        assert not mmdit_from_preset("neodragon-18").has_context_embedder
        assert mmdit_from_preset("pyramid-flow-sd3-2b", num_layers=2).has_context_embedder
    assert set(PRESETS) == {"pyramid-flow-sd3-2b", "neodragon-18"}
    with pytest.raises(UsageError, match="did you mean|known"):
        mmdit_from_preset("pyramid-flow-3b")


# ---------------------------------------------------------------- blockwise attention


@pytest.mark.parametrize("causal", [True, False])
def test_blockwise_attention_equals_dense_mask_sdpa(causal):
    gen = torch.Generator().manual_seed(3)
    frame_sizes = [3, 3, 5, 2, 7]
    text_len, batch, heads, dim = 6, 3, 2, 8
    total = text_len + sum(frame_sizes)
    q, k, v = (torch.randn(batch, heads, total, dim, generator=gen, dtype=torch.float64) for _ in range(3))
    text_valid = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=joint_attention_mask(text_valid, frame_sizes, causal))
    torch.testing.assert_close(joint_attention(q, k, v, text_valid, frame_sizes, causal), dense, atol=1e-12, rtol=0)


def test_dense_mask_rules():
    text_valid = torch.tensor([[True, False]])
    mask = joint_attention_mask(text_valid, [1, 2])[0, 0]  # tokens: valid, pad, f0, f1, f1
    expected = torch.tensor(
        [
            [1, 0, 1, 0, 0],  # valid text: valid text + frame 0
            [0, 1, 0, 0, 0],  # padded text: padded text only
            [1, 0, 1, 0, 0],  # frame 0
            [1, 0, 1, 1, 1],  # frame 1: text, frames <= 1
            [1, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_history_never_sees_the_current_clip():
    """Changing the current (noisy) clip must not change what the history tokens computed: compare
    block outputs at history positions through a forward hook."""
    model = _randomised(PyramidFlowMMDiT(**TINY))
    inputs = _inputs(model, TINY["joint_attention_dim"])
    seen = []
    model.transformer_blocks[0].register_forward_hook(lambda m, a, out: seen.append(out[0]))
    with torch.no_grad():
        model(**inputs)
        inputs["sample"][0][-1] = inputs["sample"][0][-1] + 1.0
        model(**inputs)
    history_tokens = 2 * 2 * 2  # 2 frames of 2x2 patches
    torch.testing.assert_close(seen[0][:, :history_tokens], seen[1][:, :history_tokens], atol=1e-6, rtol=0)
    assert not torch.allclose(seen[0][:, history_tokens:], seen[1][:, history_tokens:])


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    "config, name, class_name, text_width",
    [(TINY, "pyramid-flow", "PyramidDiffusionMMDiT", 20), (NEODRAGON, "neodragon", "PyramidMMDiT", 16)],
)
def test_save_load_round_trip(tmp_path, config, name, class_name, text_width):
    model = _randomised(PyramidFlowMMDiT(**config))
    model.save_pretrained(tmp_path / "ckpt")
    written = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert written["_class_name"] == class_name  # the class name carries use_context_embedder
    # interval_conditioning (Mean-Flows students) is written only when on: published configs stay as they are
    assert set(written) == {"_class_name"} | set(PyramidFlowMMDiT.config_fields()) - {"use_context_embedder", "interval_conditioning"}

    loaded = neodragon_cli.load_component("mmdit", tmp_path / "ckpt")  # auto-detect
    assert loaded.config == model.config and loaded.has_context_embedder == model.has_context_embedder
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    inputs = _inputs(model, text_width)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs)[0], model(**inputs)[0], atol=0, rtol=0)
    assert neodragon_cli.load_component(f"mmdit/{name}", tmp_path / "ckpt").config == model.config


def _broken_checkpoint(tmp_path, edit):
    folder = tmp_path / "ckpt"
    PyramidFlowMMDiT(**TINY).save_pretrained(folder)
    state = load_file(str(folder / WEIGHTS_NAME))
    edit(state)
    save_file(state, str(folder / WEIGHTS_NAME))
    return folder


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda s: s.pop("transformer_blocks.1.attn.norm_add_k.weight"), "missing keys: transformer_blocks.1.attn.norm_add_k.weight"),
        (lambda s: s.update({"transformer_blocks.1.attn.to_add_out.weight": torch.zeros(16, 16)}), "unexpected keys: transformer_blocks.1.attn.to_add_out.weight"),
        (lambda s: s.update({"proj_out.weight": torch.zeros(60, 16)}), "wrong shapes: proj_out.weight (60, 16)"),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_mismatching_checkpoint_fails_naming_the_key(tmp_path, edit, named):
    folder = _broken_checkpoint(tmp_path, edit)
    with pytest.raises(CheckpointError) as info:
        PyramidFlowMMDiT.from_pretrained(folder)
    assert named in str(info.value)


def test_layout_mismatch_between_variants(tmp_path):
    PyramidFlowMMDiT(**NEODRAGON).save_pretrained(tmp_path / "nd")
    with pytest.raises(CheckpointError, match="missing keys: context_embedder.weight"):
        PyramidFlowMMDiT.from_pretrained(tmp_path / "nd", use_context_embedder=True)


def test_runtime_flags_override_config_and_user_overrides_win(tmp_path):
    model = PyramidFlowMMDiT(**TINY, use_temporal_causal=False, interp_condition_pos=False)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = PyramidFlowMMDiT.from_pretrained(tmp_path / "ckpt")  # the reference pipeline forces them on
    assert loaded.config["use_temporal_causal"] and loaded.config["interp_condition_pos"]
    assert loaded.transformer_blocks[0].attn.causal
    custom = PyramidFlowMMDiT.from_pretrained(tmp_path / "ckpt", use_temporal_causal=False, dtype="bfloat16")
    assert not custom.transformer_blocks[0].attn.causal
    assert custom.proj_out.weight.dtype == torch.bfloat16
    with pytest.raises(UsageError, match="unknown PyramidFlowMMDiT option"):
        PyramidFlowMMDiT.from_pretrained(tmp_path / "ckpt", num_blocks=3)


def test_unsupported_config_is_a_checkpoint_error(tmp_path):
    PyramidFlowMMDiT(**TINY).save_pretrained(tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_path.read_text())
    config["pos_embed_type"] = "rope"
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="pos_embed_type 'rope'"):
        PyramidFlowMMDiT.from_pretrained(tmp_path / "ckpt")


def test_prediction_is_saved_with_the_weights_and_published_configs_predict_velocity(tmp_path):
    PyramidFlowMMDiT(**TINY, prediction="clean").save_pretrained(tmp_path / "clean")
    assert prediction_type(PyramidFlowMMDiT.from_pretrained(tmp_path / "clean")) == "clean"
    PyramidFlowMMDiT(**TINY).save_pretrained(tmp_path / "published")
    config_path = tmp_path / "published" / "config.json"
    config = json.loads(config_path.read_text())
    del config["prediction"]  # the published config.json has no such field
    config_path.write_text(json.dumps(config))
    assert prediction_type(PyramidFlowMMDiT.from_pretrained(tmp_path / "published")) == "velocity"
    assert prediction_type(PyramidFlowMMDiT(**NEODRAGON)) == "velocity"
    with pytest.raises(UsageError, match="prediction 'noise'"):
        PyramidFlowMMDiT(**TINY, prediction="noise")


# ---------------------------------------------------------------- inputs and training


def test_bad_inputs_are_usage_errors():
    model = PyramidFlowMMDiT(**TINY).eval()
    inputs = _inputs(model, 20)
    with pytest.raises(UsageError, match="width 16 != 20"):
        model(**{**inputs, "encoder_hidden_states": torch.zeros(2, 6, 16)})
    with pytest.raises(UsageError, match="larger than the current clip"):
        model(**{**inputs, "sample": [[torch.zeros(2, 4, 1, 8, 8), torch.zeros(2, 4, 1, 4, 4)]]})
    with pytest.raises(UsageError, match="cannot be split over 3 columns"):
        model(**{**inputs, "sample": [inputs["sample"][0]] * 3})


def test_training_init_and_gradient_checkpointing():
    """AdaLN-Zero init: the fresh model predicts exactly 0 and proj_out receives gradient; the
    checkpointed blocks give the same gradients as the plain ones."""
    torch.manual_seed(0)
    model = PyramidFlowMMDiT(**TINY).train()
    inputs = _inputs(model, 20)
    out = model(**inputs)[0]
    assert out.shape == (2, 4, 1, 8, 8) and torch.count_nonzero(out) == 0
    (out - 1).square().mean().backward()
    assert model.proj_out.weight.grad.abs().sum() > 0

    model = _randomised(PyramidFlowMMDiT(**TINY)).train()
    grads = []
    for use_checkpointing in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = use_checkpointing
        model(**inputs)[0].square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_caption_projection_dim_only_matters_with_a_context_embedder():
    with pytest.raises(UsageError, match="caption_projection_dim 24"):
        PyramidFlowMMDiT(**{**TINY, "caption_projection_dim": 24})
    PyramidFlowMMDiT(**{**NEODRAGON, "caption_projection_dim": 24})  # kept in the config, unused


def test_one_stage_exports_to_a_static_graph():
    """The text mask is a graph input and the block structure comes from shapes alone, so
    torch.export captures one pyramid stage (fixed history) without data-dependent branches."""
    model = _randomised(PyramidFlowMMDiT(**NEODRAGON))

    class Stage(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, older, newer, current, text, text_valid, temb):
            return self.model.forward_column([older, newer, current], text, text_valid, temb)

    gen = torch.Generator().manual_seed(5)
    args = (
        torch.randn(1, 4, 2, 4, 4, generator=gen),
        torch.randn(1, 4, 1, 8, 8, generator=gen),
        torch.randn(1, 4, 1, 8, 8, generator=gen),
        torch.randn(1, 6, 16, generator=gen),
        torch.tensor([[True, True, True, False, False, False]]),
        torch.randn(1, 16, generator=gen),
    )
    exported = torch.export.export(Stage(), args).module()
    other_mask = (args[4].clone().fill_(True),)  # a different text mask flows through the same graph
    for inputs in (args, args[:4] + other_mask + args[5:]):
        with torch.no_grad():
            torch.testing.assert_close(exported(*inputs), Stage()(*inputs), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- text padding cut


def test_padding_columns_are_cut_and_cutting_them_changes_no_output():
    """The forward cuts text columns that are padding in every row. Row 0 alone (its padding cut) must
    give what it gives beside a row that is valid to the last column (nothing cut); marking row 0's
    padding valid must change it, or the comparison would prove nothing."""
    model = _randomised(PyramidFlowMMDiT(**TINY))
    inputs = _inputs(model, TINY["joint_attention_dim"], text_len=9)  # row 0 padded from column 4 on
    widths = []
    model.context_embedder.register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
    alone = {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    alone["sample"] = [[clip[:1] for clip in inputs["sample"][0]]]
    with torch.no_grad():
        together = model(**inputs)[0]
        single = model(**alone)[0]
        alone["encoder_attention_mask"] = torch.ones_like(alone["encoder_attention_mask"])
        unmasked = model(**alone)[0]
    assert widths == [9, 4, 9]
    torch.testing.assert_close(single, together[:1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked, single, atol=1e-3)
