"""Each non-DiT network exports and validates at tiny real-layout configs: the ContextAdapter and
QuickSRNet graphs (golden checkpoints, loaded as a pipeline loads them) and both streaming decoders
(the Pyramid-Flow causal VAE, the TAEHV-style decoder of the Neodragon asymmetric VAE), whose ONNX
graphs, chained with their own state, reproduce the whole-clip PyTorch decode (and, for the golden
TAEHV decoder, the reference implementation's frames)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from neodragon_cli import load_component
from neodragon_cli.pipelines.deploy import onnx_tools
from neodragon_cli.pipelines.deploy.export import decoder_graphs, module_graph, write_graphs
from neodragon_cli.pipelines.models.causal_vae import AsymmetricCausalVideoVAE, CausalVideoVAE
from neodragon_cli.pipelines.models.latents import denormalize

SR_VARIANTS = ["small", "medium", "large"]


def graph_is_npu_clean(entry: dict) -> None:
    facts = entry["graph"]
    assert entry["validation"]["passed"], entry["validation"]
    assert facts["max_rank"] <= 5 and not {"If", "Loop", "Sin"} & set(facts["ops"])
    assert facts["min_constant"] is None or facts["min_constant"] >= -1e4


def stream_through_onnx(folder, latents: torch.Tensor) -> torch.Tensor:
    """Raw latents [1, C, T, h, w] through decoder_first / decoder_step in ONNX Runtime, carrying the
    state outputs into the next call -> video [1, 3, 8(T-1)+1, H, W]."""
    first, step = (onnx_tools.session(folder / f"{n}.onnx") for n in ("decoder_first", "decoder_step"))
    names = [i.name for i in step.get_inputs()]
    frames, *state = onnx_tools.run(first, {"latent": latents[:, :, :1]})
    chunks = [frames]
    for k in range(1, latents.shape[2]):
        frames, *state = onnx_tools.run(step, dict(zip(names, [latents[:, :, k : k + 1], *state])))
        chunks.append(frames)
    return torch.cat(chunks, dim=2)


def test_causal_vae_streaming_decoder_carries_the_conv_cache_as_tensors(tmp_path):
    torch.manual_seed(0)
    widths = dict(encoder_block_out_channels=(8, 8, 16, 16), decoder_block_out_channels=(8, 8, 16, 16))
    vae = CausalVideoVAE(encoder_layers_per_block=(1,) * 4, decoder_layers_per_block=(1,) * 4, encoder_norm_num_groups=2,
                         decoder_norm_num_groups=2, **widths).eval()  # fmt: skip
    latents = torch.randn(1, 16, 3, 2, 2)
    entries = write_graphs(decoder_graphs(vae, list(latents.split(1, dim=2))), tmp_path)
    for entry in entries.values():
        graph_is_npu_clean(entry)
    with torch.no_grad():
        whole = vae.decode(latents)
    assert onnx_tools.sqnr_db(whole, stream_through_onnx(tmp_path, latents)) >= 60


def test_taehv_streaming_decoder_carries_its_memory_as_tensors(tmp_path):
    torch.manual_seed(0)
    vae = AsymmetricCausalVideoVAE(
        encoder_block_out_channels=(8, 8, 16, 16), encoder_layers_per_block=(1,) * 4, encoder_norm_num_groups=2,
        decoder_num_features=(16, 12, 8, 8),
    ).eval()  # fmt: skip
    latents = torch.randn(1, 16, 3, 2, 3)
    specs = decoder_graphs(vae, list(latents.split(1, dim=2)))
    entries = write_graphs(specs, tmp_path)
    for entry in entries.values():
        graph_is_npu_clean(entry)
        assert "Reshape" not in entry["graph"]["ops"]  # TGrow: split + concat
    step = {i["name"]: i["shape"] for i in entries["decoder_step"]["inputs"]}
    assert len(step) == 1 + 9  # the latent and one memory per MemBlock
    assert step["state_0"] == [1, 16, 2, 3] and step["state_8"] == [1, 8, 8, 12]
    assert entries["decoder_step"]["outputs"][0]["shape"] == [1, 3, 8, 16, 24]
    with torch.no_grad():
        whole = vae.decode(latents)
    assert onnx_tools.sqnr_db(whole, stream_through_onnx(tmp_path, latents)) >= 60


def test_golden_taehv_decoder_streams_the_reference_frames(tmp_path, golden_dir):
    fixture = golden_dir / "neodragon" / "vae_decoder"
    vae = load_component("vae", fixture / "causal_video_vae")
    tensors = load_file(str(fixture / "case.safetensors"))
    normalised = tensors["video/latents_normalized"]
    raw = [denormalize(normalised[:, :, k : k + 1], vae.latent_norm, start_frame=k) for k in range(normalised.shape[2])]
    write_graphs(decoder_graphs(vae, raw), tmp_path)
    torch.testing.assert_close(stream_through_onnx(tmp_path, torch.cat(raw, dim=2)), tensors["video/frames"], rtol=1e-4, atol=1e-4)


def test_golden_context_adapter_graph(tmp_path, golden_dir):
    fixture = golden_dir / "neodragon" / "context_adapter"
    adapter = load_component("adapter", fixture / "context_adapter")
    tensors = load_file(str(fixture / "case.safetensors"))
    entry = write_graphs([module_graph("context_adapter", "context_adapter", adapter, {"x": tensors["input"][:1]}, ["text"])],
                         tmp_path)["context_adapter"]  # fmt: skip
    graph_is_npu_clean(entry)
    (output,) = onnx_tools.run(onnx_tools.session(tmp_path / "context_adapter.onnx"), {"x": tensors["input"][1:]})
    torch.testing.assert_close(output, tensors["output"][1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", SR_VARIANTS)
def test_golden_quicksrnet_graph(tmp_path, golden_dir, variant):
    fixture = golden_dir / "quicksrnet"
    sr = load_component("sr", fixture / f"quicksrnet_{variant}_2x_checkpoint_float32.pth.tar")
    tensors = load_file(str(fixture / "case.safetensors"))
    entry = write_graphs([module_graph("sr", "sr", sr, {"x": tensors["input"]}, ["upscaled"])], tmp_path)["sr"]
    graph_is_npu_clean(entry)
    assert entry["outputs"][0]["shape"] == [1, 3, 64, 96]
    (output,) = onnx_tools.run(onnx_tools.session(tmp_path / "sr.onnx"), {"x": tensors["input"]})
    torch.testing.assert_close(output, tensors[f"{variant}/output"], rtol=1e-5, atol=1e-5)
