"""Text path against the official Neodragon fixtures: DistilT5 + its T5 tokenizer, the ContextAdapter,
and the text tensors of the official hybrid / monolithic generation loops (bundle T5 side + adapter)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from neodragon_cli import load_component
from neodragon_cli.errors import CheckpointError
from neodragon_cli.pipelines.models.context_adapter import ContextAdapter
from neodragon_cli.pipelines.models.text_encoders import DistilT5, TextEncoderBundle, load_tokenizer

pytestmark = pytest.mark.golden


def _case(folder):
    return json.loads((folder / "case.json").read_text()), load_file(str(folder / "case.safetensors"))


def _close(actual, expected, tol):
    torch.testing.assert_close(actual, expected, atol=tol["atol"], rtol=tol["rtol"])


def test_context_adapter(golden_dir):
    folder = golden_dir / "neodragon" / "context_adapter"
    meta, tensors = _case(folder)
    adapter = load_component("adapter", folder / "context_adapter")
    assert isinstance(adapter, ContextAdapter)
    layer_outputs = []
    for layer in adapter.network_layers:
        layer.register_forward_hook(lambda _m, _i, out: layer_outputs.append(out))
    with torch.no_grad():
        out = adapter(tensors["input"])
    for i, got in enumerate(layer_outputs):
        torch.testing.assert_close(got, tensors[f"debug/network_layers.{i}.out"], atol=1e-5, rtol=1e-5)
    _close(out, tensors["output"], meta["tolerance"]["output"])


def test_context_adapter_config_mismatch_names_keys(golden_dir, tmp_path):
    folder = tmp_path / "context_adapter"
    shutil.copytree(golden_dir / "neodragon" / "context_adapter" / "context_adapter", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "layer_depths": [64, 56, 56, 56]}))
    with pytest.raises(CheckpointError, match=r"wrong shapes: network_layers\.0\.1\.weight \(56, 40\) vs model \(64, 40\)"):
        load_component("adapter/context-adapter", folder)


def test_distil_t5_and_tokenizer(golden_dir):
    folder = golden_dir / "neodragon" / "distil_t5"
    meta, tensors = _case(folder)
    prompts = meta["case_meta"]["prompts"]
    model = load_component("text", folder / "text_encoder_3")  # config.json picks DistilT5
    assert isinstance(model, DistilT5)
    bundle = TextEncoderBundle(load_tokenizer(folder / "tokenizer_3"), model)

    ids, mask = bundle.tokenize_t5(prompts)
    assert torch.equal(ids, tensors["input_ids"]) and torch.equal(mask, tensors["attention_mask"])
    with torch.no_grad():
        hidden = super(DistilT5, model).forward(ids, mask)  # the T5 encoder alone, before the head
        embeds, bundle_mask, pooled = bundle(prompts)
        single, _, _ = bundle(prompts[1])
    tol = meta["tolerance"]["prompt_embeds"]
    _close(hidden, tensors["encoder_last_hidden_state"], tol)
    _close(embeds, tensors["prompt_embeds"], tol)
    _close(single, tensors["single/prompt_embeds"], tol)
    assert torch.equal(bundle_mask, tensors["attention_mask"]) and bundle_mask.dtype == torch.int64
    assert pooled.shape == (len(prompts), 0)  # no CLIP side in this bundle


def test_distil_t5_as_plain_t5_names_keys(golden_dir):
    with pytest.raises(CheckpointError, match=r"missing keys: shared\.weight.*unexpected keys: encoder\.encoder\.block\.0"):
        load_component("text/t5", golden_dir / "neodragon" / "distil_t5" / "text_encoder_3")


@pytest.mark.parametrize("mode", ["hybrid", "monolithic"])
def test_generation_text_conditioning(golden_dir, mode):
    """prompt + modifier (and the negative prompt first under CFG) -> T5 ids / embeds -> adapter output."""
    nd = golden_dir / "neodragon"
    meta, tensors = _case(nd / "hybrid_generate")
    t5_folder = nd / "distil_t5"
    bundle = TextEncoderBundle(load_tokenizer(t5_folder / "tokenizer_3"), DistilT5.from_pretrained(t5_folder / "text_encoder_3"))
    adapter = ContextAdapter.from_pretrained(nd / "context_adapter" / "context_adapter")
    positive = meta[mode]["prompt"] + meta["prompt_modifier"]
    prompts = [positive] if mode == "hybrid" else [meta["negative_prompt"], positive]
    with torch.no_grad():
        embeds, mask, _ = bundle(prompts)
        hidden = adapter(embeds)
    assert torch.equal(mask[-1:], tensors[f"{mode}/text/positive/t5_attention_mask"])
    assert torch.equal(bundle.tokenize_t5(positive)[0], tensors[f"{mode}/text/positive/t5_input_ids"])
    torch.testing.assert_close(embeds, tensors[f"{mode}/text/context_adapter_input"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden, tensors[f"{mode}/text/encoder_hidden_states"], atol=1e-5, rtol=1e-5)
