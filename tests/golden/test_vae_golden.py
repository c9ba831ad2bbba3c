"""Causal video VAEs against the reference fixtures: Pyramid-Flow's CausalVideoVAE (encode, decode,
chunked encode/decode, single frame), Neodragon's asymmetric VAE decode path (de-normalisation,
post_quant_conv, TAEHV-style decoder, dropped frames, uint8 output) and the latent normalisation
constants recorded by the scheduler and Neodragon fixtures. Checkpoints are auto-detected through
`neodragon_cli.load_component("vae", folder)`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import neodragon_cli
from neodragon_cli.pipelines.data.video_io import to_uint8_frames
from neodragon_cli.pipelines.models.causal_vae import AsymmetricCausalVideoVAE, CausalVideoVAE
from neodragon_cli.pipelines.models.latents import SCHEMES, denormalize, normalize

pytestmark = pytest.mark.golden


def _case(folder):
    return json.loads((folder / "case.json").read_text()), load_file(str(folder / "case.safetensors"))


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: dict, name: str) -> None:
    assert tuple(actual.shape) == tuple(expected.shape), f"{name}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    torch.testing.assert_close(actual, expected, atol=tol["atol"], rtol=tol["rtol"], msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------- Pyramid-Flow causal VAE


@pytest.fixture
def pf_case(golden_dir):
    folder = golden_dir / "pyramid_flow" / "vae"
    meta, tensors = _case(folder)
    vae = neodragon_cli.load_component("vae", folder / meta["checkpoint"]["dir"])
    return meta, tensors, vae


def _pf_outputs(vae: CausalVideoVAE, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our outputs under the fixture's output names (see its README, 'Calls and outputs')."""
    out = {}
    with torch.no_grad():
        encodes = (("encode_video", "video", None), ("encode_video_chunk_w8", "video", 8), ("encode_image", "image", None))
        for call, video, window in encodes:
            post = vae.encode(t[video], window=window)
            out |= {f"{call}.mean": post.mean, f"{call}.logvar": post.logvar, f"{call}.moments": post.moments}
        for call, latents in (("decode_video", "latents"), ("decode_long", "latents_long"), ("decode_image", "image_latents")):
            out[f"{call}.sample"] = vae.decode(t[latents])
            if call != "decode_image":
                for w in (1, 2):
                    out[f"{call}_chunk_w{w}.sample"] = vae.decode(t[latents], window=w)
    return out


def test_pf_vae_autodetected_with_published_config(pf_case):
    meta, _, vae = pf_case
    assert isinstance(vae, CausalVideoVAE)
    assert vae.config["decoder_block_out_channels"] == meta["checkpoint"]["config"]["decoder_block_out_channels"]
    assert sum(p.numel() for p in vae.parameters()) == 1421139  # README: 1421139 parameters


def test_pf_vae_every_output_matches(pf_case):
    meta, tensors, vae = pf_case
    ours = _pf_outputs(vae, tensors)
    assert set(meta["outputs"]) <= set(ours), sorted(set(meta["outputs"]) - set(ours))
    for name, info in meta["outputs"].items():
        _close(ours[name], tensors[info["stored_as"]], meta["tolerance"], name)


def test_pf_vae_frame_counts(pf_case):
    _, tensors, vae = pf_case
    assert vae.latent_frames(tensors["video"].shape[2]) == 3 and vae.pixel_frames(5) == 33


# ---------------------------------------------------------------------- Neodragon asymmetric VAE


@pytest.fixture
def neo_case(golden_dir):
    folder = golden_dir / "neodragon" / "vae_decoder"
    meta, tensors = _case(folder)
    return meta, tensors, neodragon_cli.load_component("vae", folder / "causal_video_vae")


def test_neodragon_vae_autodetected(neo_case):
    meta, _, vae = neo_case
    assert isinstance(vae, AsymmetricCausalVideoVAE)
    assert vae.config["decoder_num_features"] == meta["model_config"]["decoder_num_features"]
    assert vae.latent_norm == "neodragon"


@pytest.mark.parametrize("case", ["video", "single_frame"])
def test_neodragon_decode_path(neo_case, case):
    meta, t, vae = neo_case
    tol = meta["tolerance"]["frames"]
    raw = denormalize(t[f"{case}/latents_normalized"], "neodragon")
    _close(raw, t[f"{case}/latents_raw"], {"atol": 1e-6, "rtol": 1e-6}, "latents_raw")
    with torch.no_grad():
        _close(vae.post_quant_conv(raw), t[f"{case}/post_quant_conv"], tol, "post_quant_conv")
        frames = vae.decode(raw)
        _close(frames, t[f"{case}/frames"], tol, "frames")
        _close(vae.decode(raw, parallel=False), t[f"{case}/frames"], tol, "frames (sequential)")
        streamed = list(vae.stream_decode(raw.split(1, dim=2)))
        # latent 0 completes only the image frame, every later latent 8 frames
        assert [s.shape[2] for s in streamed] == [1] + [8] * (raw.shape[2] - 1)
        _close(torch.cat(streamed, dim=2), t[f"{case}/frames"], tol, "frames (streamed)")
    uint8 = to_uint8_frames(frames[0])
    diff = np.abs(uint8.astype(np.int16) - t[f"{case}/frames_uint8"].numpy().astype(np.int16))
    assert diff.max() <= 1, f"uint8 frames differ by {diff.max()}"


def test_neodragon_dropped_frames_are_the_decoders_first_outputs(neo_case):
    from neodragon_cli.pipelines.models.taehv import run_stack

    meta, t, vae = neo_case
    with torch.no_grad():
        full = run_stack(vae.decoder.blocks, vae.post_quant_conv(t["video/latents_raw"]))
    assert full.shape[2] == 8 * t["video/latents_raw"].shape[2]
    _close(full[:, :, :7], t["video/decoder_dropped_frames"], meta["tolerance"]["frames"], "dropped frames")


# ---------------------------------------------------------------------- latent normalisation constants


def test_neodragon_normalisation_constants(neo_case):
    meta, _, _ = neo_case
    recorded = meta["case_meta"]["normalisation"]
    scheme = SCHEMES["neodragon"]
    assert scheme.image_scale == recorded["VAE_SCALE_FACTOR"] and scheme.image_shift == recorded["VAE_SHIFT_FACTOR"]
    assert scheme.video_scale == recorded["VAE_VIDEO_SCALE_FACTOR"] and scheme.video_shift == recorded["VAE_VIDEO_SHIFT_FACTOR"]


def test_pyramid_flow_normalisation_constants(golden_dir):
    meta = json.loads((golden_dir / "pyramid_flow" / "scheduler" / "case.json").read_text())
    recorded = meta["latent_normalisation"]
    for ours, theirs in (("pyramid-flow", "pyramid_mmdit"), ("pyramid-flow-miniflux", "pyramid_flux_from_source")):
        for field, value in recorded[theirs].items():
            assert getattr(SCHEMES[ours], field) == pytest.approx(value, abs=1e-12), (ours, field)


def test_normalise_roundtrips_the_fixture_latents(neo_case):
    _, t, _ = neo_case
    again = normalize(t["video/latents_raw"], "neodragon")
    torch.testing.assert_close(again, t["video/latents_normalized"], atol=1e-5, rtol=1e-5)
