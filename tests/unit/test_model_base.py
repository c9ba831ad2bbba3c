"""The model base shared by every family, checked on a tiny config of each: save_pretrained ->
from_pretrained round trips (state, outputs, config), dtype, unknown overrides, all-or-nothing
loading, corrupt files, and the capabilities the later commands read."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from neodragon_cli.errors import CheckpointError, UsageError
from neodragon_cli.pipelines.models.base import PretrainedModel, parameters_on_meta
from neodragon_cli.pipelines.models.causal_vae import AsymmetricCausalVideoVAE, CausalVideoVAE, DiagonalGaussian
from neodragon_cli.pipelines.models.checkpoint import read_state_dict
from neodragon_cli.pipelines.models.context_adapter import ContextAdapter
from neodragon_cli.pipelines.models.mmdit import PyramidFlowMMDiT
from neodragon_cli.pipelines.models.quicksrnet import QuickSRNet, QuickSRNetSmall
from neodragon_cli.pipelines.models.taehv import TAEHV, TAEHVDecoder
from neodragon_cli.pipelines.models.text_encoders import CLIPTextEncoder, DistilT5, T5TextEncoder, clip_text_config, t5_config

MMDIT = dict(
    sample_size=32, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
    caption_projection_dim=16, pooled_projection_dim=12, pos_embed_max_size=16, joint_attention_dim=20,
)  # fmt: skip
ENCODER = dict(encoder_block_out_channels=(8, 8, 16, 16), encoder_layers_per_block=(1, 1, 1, 1), encoder_norm_num_groups=4)
TINY_T5 = dict(vocab_size=64, d_model=16, num_layers=2, num_heads=2, d_ff=24)
TINY_CLIP = dict(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24, projection_dim=8,
                 max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=0)  # fmt: skip

FAMILIES = {
    "mmdit-pyramid-flow": lambda: PyramidFlowMMDiT(**MMDIT),
    "mmdit-neodragon": lambda: PyramidFlowMMDiT(**MMDIT, use_context_embedder=False),
    "causal-vae": lambda: CausalVideoVAE(
        **ENCODER, decoder_block_out_channels=(8, 8, 16, 16), decoder_layers_per_block=(1, 1, 1, 1), decoder_norm_num_groups=4
    ),
    "asymmetric-vae": lambda: AsymmetricCausalVideoVAE(**ENCODER, decoder_num_features=(16, 12, 8, 8)),
    "taehv": lambda: TAEHV(),
    "t5": lambda: T5TextEncoder(t5_config(**TINY_T5)),
    "distil-t5": lambda: DistilT5(t5_config(**TINY_T5), project_out_dim=12),
    "clip": lambda: CLIPTextEncoder(clip_text_config(**TINY_CLIP)),
    "context-adapter": lambda: ContextAdapter(input_dims=6, output_dims=5, layer_depths=(7, 9), skips=(False, True)),
    "quicksrnet": lambda: QuickSRNet(scaling_factor=2, num_channels=8, num_intermediate_layers=1, use_ito_connection=True),
    "quicksrnet-small": lambda: QuickSRNetSmall(3),
}
VAES = (CausalVideoVAE, AsymmetricCausalVideoVAE, TAEHV, TAEHVDecoder)


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_model(name: str) -> PretrainedModel:
    """The family's tiny model with every parameter random (inits zero many of them)."""
    torch.manual_seed(0)
    model = FAMILIES[name]().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, DiagonalGaussian):
        return [output.moments]
    return [t for item in output for t in _tensors(item)]


def _outputs(model: nn.Module, inputs: dict) -> list[torch.Tensor]:
    torch.manual_seed(1)  # the VAEs sample their posterior
    with torch.no_grad():
        return _tensors(model(**inputs))


def _weights_file(model: PretrainedModel, folder):
    return folder / model.weights_names[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (model, folder written by save_pretrained)."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name in FAMILIES:
        model = _random_model(name)
        model.save_pretrained(root / name)
        out[name] = (model, root / name)
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_round_trip_same_state_outputs_and_config(saved, name):
    model, folder = saved[name]
    loaded = type(model).from_pretrained(folder)
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.config == model.config
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for key, value in loaded.state_dict().items():
        assert not value.is_meta and torch.equal(value, expected[key]), key
    inputs = model.example_inputs(batch=2)
    for got, want in zip(_outputs(loaded, inputs), _outputs(model, inputs), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("name", FAMILIES)
def test_dtype_is_honoured(saved, name):
    model, folder = saved[name]
    loaded = type(model).from_pretrained(folder, dtype=torch.bfloat16)
    floats = [t for t in [*loaded.parameters(), *loaded.buffers()] if t.is_floating_point()]
    assert floats and all(t.dtype == torch.bfloat16 for t in floats)
    assert type(model).from_pretrained(folder, dtype="float16").parameters().__next__().dtype == torch.float16


@pytest.mark.parametrize("name", FAMILIES)
def test_unknown_override_is_rejected_naming_the_known_ones(saved, name):
    model, folder = saved[name]
    with pytest.raises(UsageError) as info:
        type(model).from_pretrained(folder, num_blokcs=3)
    assert "num_blokcs" in info.value.message
    assert all(field in info.value.hint for field in type(model).config_fields())


@pytest.mark.parametrize("name", FAMILIES)
def test_mismatching_checkpoint_fails_with_nothing_loaded(saved, name, tmp_path, monkeypatch):
    """The last key of the published file gets a wrong shape: the check runs before any tensor is copied."""
    import shutil

    model, folder = saved[name]
    broken = shutil.copytree(folder, tmp_path / "broken")
    weights = _weights_file(model, broken)
    state = load_file(str(weights))
    last = sorted(state)[-1]
    state[last] = torch.zeros(*state[last].shape, 2)
    save_file(state, str(weights))

    def no_load(*args, **kwargs):
        raise AssertionError("load_state_dict was called before the checkpoint was checked")

    monkeypatch.setattr(nn.Module, "load_state_dict", no_load)
    with pytest.raises(CheckpointError, match=f"wrong shapes: {last}"):
        type(model).from_pretrained(broken)


@pytest.mark.parametrize("name", FAMILIES)
def test_capabilities_are_declared_on_the_class(saved, name):
    model, _ = saved[name]
    cls = type(model)
    for attribute in ("repeated_blocks", "keep_precision"):
        declared = getattr(cls, attribute)
        assert isinstance(declared, tuple) and all(isinstance(p, str) for p in declared), attribute
    for path, blocks in model.block_lists().items():
        assert isinstance(blocks, nn.ModuleList) and len(blocks) >= 1, path
    names = {n for n, _ in model.named_modules()}
    assert set(model.modules_kept_in_precision()) <= names
    assert bool(model.modules_kept_in_precision()) == bool(cls.keep_precision)
    inputs = model.example_inputs(batch=3)
    assert all(t.shape[0] == 3 for t in _tensors(list(inputs.values())))


def test_the_capabilities_later_commands_read():
    assert PyramidFlowMMDiT.repeated_blocks == ("transformer_blocks",)
    assert len(_random_model("mmdit-neodragon").block_lists()["transformer_blocks"]) == MMDIT["num_layers"]
    assert "time_text_embed" in _random_model("mmdit-pyramid-flow").modules_kept_in_precision()
    assert "" in _random_model("context-adapter").modules_kept_in_precision()  # the whole adapter stays in float


@pytest.mark.parametrize("cls", VAES)
def test_every_vae_declares_its_compression(cls):
    for factor in ("temporal_compression", "spatial_compression"):
        assert isinstance(getattr(cls, factor), property), factor
    assert (CausalVideoVAE.latent_norm, AsymmetricCausalVideoVAE.latent_norm, TAEHV.latent_norm) == (
        "pyramid-flow", "neodragon", None,
    )  # fmt: skip


def test_compression_factors_follow_the_config():
    with torch.device("meta"):
        assert (CausalVideoVAE().temporal_compression, CausalVideoVAE().spatial_compression) == (8, 8)
        pf = CausalVideoVAE(encoder_temporal_down_sample=(True, True, False, False), decoder_temporal_up_sample=(True, True, False, False))
        assert (pf.temporal_compression, pf.spatial_compression) == (4, 8)
        assert (AsymmetricCausalVideoVAE().temporal_compression, AsymmetricCausalVideoVAE().spatial_compression) == (8, 8)
        assert (TAEHV().temporal_compression, TAEHV(patch_size=2).spatial_compression) == (4, 16)
        assert (TAEHVDecoder().temporal_compression, TAEHVDecoder(space_upscale=(True, True, False)).spatial_compression) == (8, 4)


def test_config_is_recorded_from_the_outermost_constructor():
    small = QuickSRNetSmall(4)
    assert small.config == {"scaling_factor": 4}
    assert QuickSRNetSmall.config_fields() == ["scaling_factor"]
    adapter = ContextAdapter(input_dims=6, output_dims=5, layer_depths=(7,), skips=(True,))
    assert adapter.config["layer_depths"] == [7] and adapter.config["activation_fn"] == "gelu"  # JSON-ready, defaults filled


def test_building_on_meta_keeps_derived_buffers_real():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.tied = nn.Linear(4, 4)
            self.tied.weight = self.linear.weight
            self.register_buffer("table", torch.ones(3))
            self.register_buffer("derived", torch.arange(3), persistent=False)

    with parameters_on_meta():
        model = Model()
    assert model.linear.weight.is_meta and model.table.is_meta
    assert model.tied.weight is model.linear.weight
    assert torch.equal(model.derived, torch.arange(3))
    assert not nn.Linear(2, 2).weight.is_meta  # the patch ends with the block


def test_mmdit_class_name_sets_the_variant(saved, tmp_path):
    neodragon = PyramidFlowMMDiT.from_pretrained(saved["mmdit-neodragon"][1])
    assert not neodragon.has_context_embedder and not hasattr(neodragon, "context_embedder")
    assert neodragon.published_config()["_class_name"] == "PyramidMMDiT"
    assert PyramidFlowMMDiT.from_pretrained(saved["mmdit-pyramid-flow"][1]).published_config()["_class_name"] == "PyramidDiffusionMMDiT"


# ---------------------------------------------------------------------- corrupt files


def _corrupt(path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else b"not a checkpoint at all" * 4)


@pytest.mark.parametrize("how", ["truncated", "garbage"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_corrupt_file_names_it_and_says_it_is_not_a_checkpoint(tmp_path, suffix, how):
    path = tmp_path / f"weights{suffix}"
    state = {"a": torch.zeros(64), "b": torch.ones(8, 8)}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    assert read_state_dict(path).keys() == state.keys()
    _corrupt(path, how)
    with pytest.raises(CheckpointError, match="is not a valid checkpoint file") as info:
        read_state_dict(path)
    assert str(path) in info.value.message


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_loaders_report_corrupt_weights(saved, tmp_path, how):
    import shutil

    model, folder = saved["mmdit-pyramid-flow"]
    broken = shutil.copytree(folder, tmp_path / "mmdit")
    _corrupt(_weights_file(model, broken), how)
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors is not a valid checkpoint file"):
        PyramidFlowMMDiT.from_pretrained(broken)
    pth = tmp_path / "taehv.pth"
    torch.save(saved["taehv"][0].state_dict(), pth)
    _corrupt(pth, how)
    with pytest.raises(CheckpointError, match="taehv.pth is not a valid checkpoint file"):
        TAEHV.from_pretrained(pth)
