"""Text path against the official Neodragon fixtures: DistilT5 + its T5 tokenizer, the ContextAdapter,
and the text tensors of the official hybrid / monolithic generation loops (bundle T5 side + adapter).

Prompts, padding length, widths, key names and tolerances come from the fixtures' case.json files and
checkpoints."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from golden_case import case, checkpoint_folder, params, tol
from safetensors.torch import load_file

from neodragon_cli import load_component
from neodragon_cli.errors import CheckpointError
from neodragon_cli.pipelines.models.text_encoders import TextEncoderBundle, load_tokenizer

pytestmark = pytest.mark.golden

ADAPTER = "neodragon/context_adapter"
T5 = "neodragon/distil_t5"
GENERATE = "neodragon/hybrid_generate"


def _close(actual, expected, tolerance):
    torch.testing.assert_close(actual, expected, **tolerance)


def _adapter_folder(golden_dir):
    folder = golden_dir / ADAPTER
    meta, _ = case(folder)
    return checkpoint_folder(folder, meta["checkpoint"])


def _t5(golden_dir):
    """(case.json, tensors, encoder folder, tokenizer folder) of the DistilT5 fixture."""
    folder = golden_dir / T5
    meta, tensors = case(folder)
    return meta, tensors, checkpoint_folder(folder, meta["checkpoint"]["text_encoder_3"]), checkpoint_folder(folder, meta["checkpoint"]["tokenizer_3"])


def _bundle(golden_dir):
    meta, _, encoder, tokenizer = _t5(golden_dir)
    model = load_component("text", encoder)  # config.json picks the DistilT5 layout
    return TextEncoderBundle(load_tokenizer(tokenizer), model, max_length=meta["case_meta"]["max_length"])


def test_context_adapter(golden_dir):
    meta, tensors = case(golden_dir / ADAPTER)
    adapter = load_component("adapter", _adapter_folder(golden_dir))
    tolerance = tol(meta["tolerance"]["output"])
    layer_outputs = []
    for layer in adapter.network_layers:
        layer.register_forward_hook(lambda _m, _i, out: layer_outputs.append(out))
    with torch.no_grad():
        out = adapter(tensors["input"])
    recorded = [k for k in tensors if re.fullmatch(r"debug/network_layers\.\d+\.out", k)]
    assert len(layer_outputs) == len(recorded)
    for i, got in enumerate(layer_outputs):  # the README compares the debug tensors like the output
        _close(got, tensors[f"debug/network_layers.{i}.out"], tolerance)
    assert list(out.shape[-1:]) == [meta["model_config"]["output_dims"]]
    _close(out, tensors["output"], tolerance)


def test_context_adapter_config_mismatch_names_keys(golden_dir, tmp_path):
    """A config whose first depth differs from the weights names the first layer's weight and both shapes."""
    folder = tmp_path / "context_adapter"
    shutil.copytree(_adapter_folder(golden_dir), folder)
    config = json.loads((folder / "config.json").read_text())
    depths, width_in = config["layer_depths"], config["input_dims"]
    wrong = depths[0] + 8
    (folder / "config.json").write_text(json.dumps({**config, "layer_depths": [wrong, *depths[1:]]}))
    stored = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    (key,) = [k for k, v in stored.items() if k.startswith("network_layers.0.") and k.endswith(".weight") and v.dim() == 2]
    assert list(stored[key].shape) == [depths[0], width_in]
    expected = f"wrong shapes: {key} ({depths[0]}, {width_in}) vs model ({wrong}, {width_in})"
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        load_component("adapter/context-adapter", folder)


def test_distil_t5_and_tokenizer(golden_dir):
    meta, tensors, _, _ = _t5(golden_dir)
    prompts = meta["case_meta"]["prompts"]
    tolerance = tol(meta["tolerance"]["prompt_embeds"])
    assert meta["tolerance"]["input_ids"] == meta["tolerance"]["attention_mask"] == "exact"
    bundle = _bundle(golden_dir)
    model = bundle.t5_encoder

    ids, mask = bundle.tokenize_t5(prompts)
    assert torch.equal(ids, tensors["input_ids"]) and torch.equal(mask, tensors["attention_mask"])
    assert mask.sum(1).tolist() == meta["case_meta"]["num_valid_tokens"]
    # the prompt tokenized alone ("single/") is whichever sample row has its ids
    (single_index,) = [i for i in range(len(prompts)) if torch.equal(ids[i : i + 1], tensors["single/input_ids"])]
    hidden = []  # the T5 encoder alone: the input of the projection head
    handle = model.final_projection.register_forward_pre_hook(lambda _m, args: hidden.append(args[0]))
    try:
        with torch.no_grad():
            embeds, bundle_mask, pooled = bundle(prompts)
            single, single_mask, _ = bundle(prompts[single_index])
    finally:
        handle.remove()
    _close(hidden[0], tensors["encoder_last_hidden_state"], tolerance)
    _close(embeds, tensors["prompt_embeds"], tolerance)
    _close(single, tensors["single/prompt_embeds"], tolerance)
    assert torch.equal(single_mask, tensors["single/attention_mask"])
    assert torch.equal(bundle_mask, tensors["attention_mask"]) and bundle_mask.dtype == torch.int64
    assert pooled.shape == (len(prompts), 0)  # no CLIP side in this bundle


def test_distil_t5_as_plain_t5_names_keys(golden_dir):
    """Loading the DistilT5 folder as a plain T5 fails naming keys: the missing ones are not in the
    checkpoint and the unexpected ones are."""
    _, _, encoder, _ = _t5(golden_dir)
    stored = set(load_file(str(encoder / "model.safetensors")))
    with pytest.raises(CheckpointError) as info:
        load_component("text/t5", encoder)
    message = str(info.value)
    listed = {}
    for label in ("missing keys", "unexpected keys"):
        found = re.search(rf"{label}: ([^;]+)", message)
        assert found, f"{label} not named in: {message}"
        listed[label] = [item.split()[0] for item in found.group(1).split(", ")]  # drop "(+n more)", hints
    assert listed["missing keys"] and not set(listed["missing keys"]) & stored
    assert listed["unexpected keys"] and set(listed["unexpected keys"]) <= stored


def _generation_modes(meta):
    return [mode for mode in meta["case_meta"] if isinstance(meta["case_meta"][mode], dict) and "noise_order" in meta["case_meta"][mode]]


@pytest.mark.parametrize("mode", params(GENERATE, _generation_modes))
def test_generation_text_conditioning(golden_dir, mode):
    """prompt + modifier (and the negative prompt first under CFG) -> T5 ids / embeds -> adapter output."""
    meta, tensors = case(golden_dir / GENERATE)
    t5_meta, _, _, _ = _t5(golden_dir)
    adapter_meta, _ = case(golden_dir / ADAPTER)
    bundle = _bundle(golden_dir)
    adapter = load_component("adapter", _adapter_folder(golden_dir))
    positive = meta[mode]["prompt"] + meta["prompt_modifier"]
    p = f"{mode}/text/"
    cfg = f"{p}negative/t5_input_ids" in tensors  # the negative prompt is encoded only under CFG
    prompts = [meta["negative_prompt"], positive] if cfg else [positive]
    with torch.no_grad():
        embeds, mask, _ = bundle(prompts)
        hidden = adapter(embeds)
    assert torch.equal(mask[-1:], tensors[f"{p}positive/t5_attention_mask"])
    assert torch.equal(bundle.tokenize_t5(positive)[0], tensors[f"{p}positive/t5_input_ids"])
    if cfg:
        assert torch.equal(mask[:1], tensors[f"{p}negative/t5_attention_mask"])
        assert torch.equal(bundle.tokenize_t5(meta["negative_prompt"])[0], tensors[f"{p}negative/t5_input_ids"])
    # the tolerances of the fixtures of the two models that made these tensors
    _close(embeds, tensors[f"{p}context_adapter_input"], tol(t5_meta["tolerance"]["prompt_embeds"]))
    _close(hidden, tensors[f"{p}encoder_hidden_states"], tol(adapter_meta["tolerance"]["output"]))
