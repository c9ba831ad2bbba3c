"""Text encoders, tokenizers, bundle and ContextAdapter (+ distillation modes) at tiny sizes; real-size
parameter counts on the meta device."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from neodragon_cli import load_component, registry
from neodragon_cli.errors import CheckpointError, UsageError
from neodragon_cli.pipelines.models.checkpoint import count_parameters
from neodragon_cli.pipelines.models.context_adapter import (
    ContextAdapter,
    ExtendedContextAdapter,
    LoRALinear,
    StudentTextPath,
    merge_lora,
)
from neodragon_cli.pipelines.models.text_encoders import (
    CLIP_SIZES,
    T5_SIZES,
    CLIPTextEncoder,
    DistilT5,
    T5TextEncoder,
    TextEncoderBundle,
    clip_text_config,
    load_tokenizer,
    t5_config,
    train_t5_tokenizer,
)

CAPTIONS = [
    f"a {size} {color} {shape} {motion} on a {bg} background"
    for size in ("small", "large")
    for color in ("red", "green", "blue", "yellow", "cyan")
    for shape in ("circle", "square", "triangle", "disc", "box")
    for motion in ("moving left", "sliding to the right", "drifting upward", "resting")
    for bg in ("black", "gray", "navy")
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_t5_tokenizer(CAPTIONS, tmp_path_factory.mktemp("tok") / "tokenizer_3", vocab_size=64)


def _tiny_t5(cls=T5TextEncoder, **kw):
    torch.manual_seed(0)
    return cls(t5_config(vocab_size=200, d_model=16, num_layers=2, num_heads=2, d_ff=24), **kw).eval()


def _tiny_clip(width, seed):
    torch.manual_seed(seed)
    cfg = clip_text_config(vocab_size=200, hidden_size=width, num_layers=1, num_heads=2, intermediate_size=24,
                           projection_dim=width // 2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    return CLIPTextEncoder(cfg).eval()


# ---------------------------------------------------------------------------------------------- sizes


def _t5_encoder_params(vocab_size, d_model, num_layers, num_heads, d_ff, d_kv):
    inner = num_heads * d_kv
    block = 4 * d_model * inner + 3 * d_model * d_ff + 2 * d_model
    return vocab_size * d_model + num_layers * block + 32 * num_heads + d_model


def test_real_size_parameter_counts_on_meta():
    base = T5_SIZES["flan-t5-base"]
    with torch.device("meta"):
        adapter = ContextAdapter()
        distil = DistilT5(t5_config(**base))
        xxl = T5TextEncoder(t5_config(**T5_SIZES["t5-v1_1-xxl"]))
        clip_l = CLIPTextEncoder(clip_text_config(**CLIP_SIZES["clip-l"]))
        clip_g = CLIPTextEncoder(clip_text_config(**CLIP_SIZES["clip-g"]))
    assert count_parameters(adapter) == 4096 * 4096 + 4096 + 3 * (8192 * 4096 + 4096) + 8192 * 1536 + 1536 == 130_041_344
    assert count_parameters(distil) == _t5_encoder_params(**base) + 768 * 4096 + 4096 * 4096
    assert count_parameters(distil) / 1e6 == pytest.approx(129.6, abs=0.05)
    assert count_parameters(xxl) / 1e9 == pytest.approx(4.762, abs=0.001)  # the paper's T5-XXL figure
    assert count_parameters(clip_l) / 1e6 == pytest.approx(123.7, abs=0.05)
    assert count_parameters(clip_g) / 1e6 == pytest.approx(694.7, abs=0.05)


# ---------------------------------------------------------------------------------------------- tokenizer


def test_t5_tokenizer_conventions(tokenizer, tmp_path):
    n = len(tokenizer)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == n - 1
    assert tokenizer.convert_tokens_to_ids("<extra_id_99>") == n - 100
    enc = tokenizer(["a red circle", " ".join(CAPTIONS[:20])], padding="max_length", max_length=16, truncation=True)
    first, long = enc.input_ids
    valid = sum(enc.attention_mask[0])
    assert first[valid - 1] == 1 and set(first[valid:]) == {0}  # </s> appended, then padding
    assert long[-1] == 1 and all(enc.attention_mask[1])  # truncated with </s> kept last
    tokenizer.save_pretrained(str(tmp_path / "copy"))
    config = json.loads((tmp_path / "copy" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "T5Tokenizer" and (tmp_path / "copy" / "spiece.model").is_file()
    assert load_tokenizer(tmp_path / "copy")(CAPTIONS[:3]).input_ids == tokenizer(CAPTIONS[:3]).input_ids


# ---------------------------------------------------------------------------------------------- encoders


@pytest.mark.parametrize("kind,build", [
    ("text/t5", lambda: _tiny_t5()),
    ("text/distil-t5", lambda: _tiny_t5(DistilT5, project_out_dim=12)),
    ("text/clip", lambda: _tiny_clip(16, 1)),
])
def test_encoder_round_trip_and_detection(tmp_path, kind, build):
    model = build()
    model.save_pretrained(tmp_path / "m")
    assert [c.key for c in registry.detect(tmp_path / "m", "text")] == [kind]
    loaded = load_component("text", tmp_path / "m")
    assert type(loaded) is type(model)
    ids = torch.randint(3, 200, (2, 9))
    ids[:, -1] = 1
    with torch.no_grad():
        args = (ids,) if kind == "text/clip" else (ids, torch.ones_like(ids))
        assert torch.equal(loaded(*args), model(*args))


def test_published_t5_layout_stores_tied_embedding_once(tmp_path):
    model = _tiny_t5(DistilT5, project_out_dim=12)
    model.save_pretrained(tmp_path / "d")
    keys = set(load_file(str(tmp_path / "d" / "model.safetensors")))
    assert "encoder.shared.weight" in keys and "encoder.encoder.embed_tokens.weight" not in keys
    assert {"final_projection.0.weight", "final_projection.3.weight"} <= keys
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert (config["project_in_dim"], config["project_out_dim"], config["out_dim"]) == (16, 12, 12)
    loaded = DistilT5.from_pretrained(tmp_path / "d")
    assert loaded.encoder.shared.weight is loaded.encoder.encoder.embed_tokens.weight  # still tied


def test_distil_t5_missing_head_fails_naming_key(tmp_path):
    _tiny_t5(DistilT5, project_out_dim=12).save_pretrained(tmp_path / "d")
    weights = tmp_path / "d" / "model.safetensors"
    state = load_file(str(weights))
    del state["final_projection.3.weight"]
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=r"missing keys: final_projection\.3\.weight"):
        load_component("text", tmp_path / "d")


def test_sharded_weights(tmp_path):
    model = _tiny_t5()
    model.save_pretrained(tmp_path / "t")
    state = load_file(str(tmp_path / "t" / "model.safetensors"))
    (tmp_path / "t" / "model.safetensors").unlink()
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, str(tmp_path / "t" / name))
    index = {"weight_map": {k: name for name, part in halves.items() for k in part}}
    (tmp_path / "t" / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = T5TextEncoder.from_pretrained(tmp_path / "t")
    assert all(torch.equal(v, loaded.encoder.state_dict()[k]) for k, v in state.items())


# ---------------------------------------------------------------------------------------------- bundle


def test_bundle_outputs_and_round_trip(tokenizer, tmp_path):
    t5 = _tiny_t5(DistilT5, project_out_dim=12)
    clips = [_tiny_clip(16, 1), _tiny_clip(24, 2)]
    bundle = TextEncoderBundle(tokenizer, t5, [tokenizer, tokenizer], clips).eval()
    prompts = ["a red circle moving left", "a blue box resting on a gray background"]
    with torch.no_grad():
        embeds, mask, pooled = bundle(prompts)
    assert embeds.shape == (2, 128, 12) and mask.shape == (2, 128) and mask.dtype == torch.int64
    assert pooled.shape == (2, 8 + 12) == (2, bundle.pooled_dim)
    # independently: tokenizer -> encoders, CLIP-L first
    t5_enc = tokenizer(prompts, padding="max_length", max_length=128, truncation=True, return_tensors="pt")
    clip_ids = tokenizer(prompts, padding="max_length", max_length=32, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(embeds, t5(t5_enc.input_ids, t5_enc.attention_mask))
        torch.testing.assert_close(pooled, torch.cat([clips[0](clip_ids), clips[1](clip_ids)], dim=-1))
    assert torch.equal(mask, t5_enc.attention_mask)

    bundle.save_pretrained(tmp_path / "root")
    assert {"tokenizer", "tokenizer_2", "tokenizer_3", "text_encoder", "text_encoder_2", "text_encoder_3"} <= {
        p.name for p in (tmp_path / "root").iterdir()
    }
    loaded = load_component("text", tmp_path / "root")
    assert isinstance(loaded, TextEncoderBundle)
    with torch.no_grad():
        for a, b in zip(loaded(prompts), (embeds, mask, pooled)):
            assert torch.equal(a, b)
    half = TextEncoderBundle.from_pretrained(tmp_path / "root", dtype="bfloat16")  # every encoder in the dtype
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


# ---------------------------------------------------------------------------------------------- adapter


def test_adapter_layout_without_skips_and_round_trip(tmp_path):
    torch.manual_seed(0)
    adapter = ContextAdapter(input_dims=6, output_dims=5, layer_depths=(7, 9), skips=(False, True)).eval()
    shapes = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    assert shapes == {
        "network_layers.0.1.weight": (7, 6), "network_layers.0.1.bias": (7,),
        "network_layers.1.1.weight": (9, 7), "network_layers.1.1.bias": (9,),  # no skip: previous depth only
        "network_layers.2.0.weight": (5, 6 + 9), "network_layers.2.0.bias": (5,),
    }
    x = torch.randn(2, 3, 6)
    with torch.no_grad():
        l0, l1, out = adapter.network_layers
        expected = out(torch.cat([x, l1(l0(x))], dim=-1))
        torch.testing.assert_close(adapter(x), expected)
    adapter.save_pretrained(tmp_path / "ca")
    assert (tmp_path / "ca" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_component("adapter", tmp_path / "ca")
    with torch.no_grad():
        assert torch.equal(loaded(x), adapter(x))


def test_extend_mode_folds_into_replace_mode():
    torch.manual_seed(0)
    adapter = ContextAdapter(input_dims=12, output_dims=10, layer_depths=(8, 8), skips=(True, True))
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn_like(p))
    embedder = torch.nn.Linear(10, 6)
    cascade = ExtendedContextAdapter(adapter, embedder)
    assert not any(p.requires_grad for p in embedder.parameters())
    x = torch.randn(2, 4, 12)
    with torch.no_grad():
        folded = cascade.fold()
        torch.testing.assert_close(folded(x), embedder(adapter(x)), atol=1e-5, rtol=1e-5)
    assert folded.config["output_dims"] == 6
    with pytest.raises(UsageError, match="must equal"):
        ExtendedContextAdapter(adapter, torch.nn.Linear(9, 6))


def test_lora_starts_at_base_and_merges_exactly():
    torch.manual_seed(0)
    student = _tiny_t5(DistilT5, project_out_dim=12)
    ids = torch.randint(3, 200, (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        before = student(ids, mask)
    adapter = ContextAdapter(input_dims=12, output_dims=8, layer_depths=(8,), skips=(True,))
    path = StudentTextPath("lora", student, adapter, lora_rank=2).eval()
    wrapped = [m for m in student.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 2 * (4 + 3)  # q, k, v, o, wi_0, wi_1, wo per block
    with torch.no_grad():
        torch.testing.assert_close(student(ids, mask), before)  # up = 0 at start
        for m in wrapped:
            m.up.weight.normal_(0, 0.1)
        adapted = student(ids, mask)
    assert not torch.allclose(adapted, before)
    merge_lora(student)
    assert not any(isinstance(m, LoRALinear) for m in student.modules())
    with torch.no_grad():
        torch.testing.assert_close(student(ids, mask), adapted, atol=1e-5, rtol=1e-5)
    assert path.mode == "LORA"


@pytest.mark.parametrize("mode", ["RM", "EM", "LORA", "TDT5"])
def test_modes_train_the_documented_parameters(mode):
    student = _tiny_t5(DistilT5, project_out_dim=12)
    adapter = ContextAdapter(input_dims=12, output_dims=10 if mode == "EM" else 6, layer_depths=(8,), skips=(True,))
    embedder = torch.nn.Linear(10, 6) if mode == "EM" else None
    path = StudentTextPath(mode, student, adapter, context_embedder=embedder).train()
    trainable = {id(p) for p in path.trainable_parameters()}
    adapter_ids = {id(p) for p in adapter.parameters()}
    lora_ids = {id(p) for m in student.modules() if isinstance(m, LoRALinear) for p in (m.down.weight, m.up.weight)}
    student_ids = {id(p) for p in student.parameters()} - lora_ids
    expected = adapter_ids | {"RM": set(), "EM": set(), "LORA": lora_ids, "TDT5": student_ids}[mode]
    assert trainable == expected
    assert student.training == (mode in ("LORA", "TDT5"))  # a frozen student runs without dropout
    ids = torch.randint(3, 200, (2, 5))
    assert path(ids, torch.ones_like(ids)).shape == (2, 5, 6)
    exported_student, exported_adapter = path.export()
    assert isinstance(exported_adapter, ContextAdapter) and exported_adapter.config["output_dims"] == 6
    assert not any(isinstance(m, LoRALinear) for m in exported_student.modules())


def test_mode_errors():
    student, adapter = _tiny_t5(), ContextAdapter(input_dims=16, output_dims=4, layer_depths=(4,), skips=(True,))
    with pytest.raises(UsageError, match="unknown text-distillation mode"):
        StudentTextPath("XX", student, adapter)
    with pytest.raises(UsageError, match="context embedder"):
        StudentTextPath("EM", student, adapter)
