"""Causal video VAEs against the reference fixtures: Pyramid-Flow's CausalVideoVAE (encode, decode,
chunked encode/decode, single frame), Neodragon's asymmetric VAE decode path (de-normalisation,
post_quant_conv, TAEHV-style decoder, dropped frames, uint8 output) and the latent normalisation
constants recorded by the scheduler and Neodragon fixtures. Checkpoints are auto-detected through
`neodragon_cli.load_component("vae", folder)`. Calls, cases, frame counts, parameter counts and
tolerances come from the fixtures' case.json."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from golden_case import case, checkpoint_folder, params, uint8_tolerance
from golden_case import meta as case_json

import neodragon_cli
from neodragon_cli.pipelines.data.video_io import to_uint8_frames
from neodragon_cli.pipelines.models.latents import SCHEMES, denormalize, normalize

pytestmark = pytest.mark.golden

PF = "pyramid_flow/vae"
ND = "neodragon/vae_decoder"


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: dict, name: str) -> None:
    assert tuple(actual.shape) == tuple(expected.shape), f"{name}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    torch.testing.assert_close(actual, expected, atol=tol["atol"], rtol=tol["rtol"], msg=lambda m: f"{name}: {m}")


def _config_matches(vae, published: dict) -> None:
    """Every published config field our model records has the published value."""
    shared = [k for k in published if not k.startswith("_") and k in vae.config]
    assert shared and {k: vae.config[k] for k in shared} == {k: published[k] for k in shared}


# ---------------------------------------------------------------------- Pyramid-Flow causal VAE


@pytest.fixture
def pf_case(golden_dir):
    folder = golden_dir / PF
    meta, tensors = case(folder)
    vae = neodragon_cli.load_component("vae", folder / meta["checkpoint"]["dir"])
    return meta, tensors, vae


def _pf_call(text: str) -> tuple[str, str, int | None]:
    """(encode|decode, input tensor, window or None) from a case.json call such as
    'vae.decode(latents, temporal_chunk=True, window_size=2).sample  (...)'."""
    found = re.search(r"vae\.(encode|decode)\((\w+)([^)]*)\)", text)
    assert found, f"cannot read the call {text!r}"
    window = re.search(r"window_size=(\d+)", found.group(3)) if "temporal_chunk=True" in found.group(3) else None
    return found.group(1), found.group(2), int(window.group(1)) if window else None


def _pf_outputs(vae, meta: dict, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our outputs under the fixture's output names `<call>.<field>`, each call as case.json records it."""
    out = {}
    with torch.no_grad():
        for call, text in meta["calls"].items():
            op, name, window = _pf_call(text)
            if op == "encode":
                post = vae.encode(t[name], window=window)
                out |= {f"{call}.mean": post.mean, f"{call}.logvar": post.logvar, f"{call}.moments": post.moments}
            else:
                out[f"{call}.sample"] = vae.decode(t[name], window=window)
    return out


def test_pf_vae_autodetected_with_published_config(pf_case):
    meta, _, vae = pf_case
    _config_matches(vae, meta["checkpoint"]["config"])
    assert sum(p.numel() for p in vae.parameters()) == meta["checkpoint"]["num_params"]
    assert len(vae.state_dict()) == meta["checkpoint"]["num_tensors"]


def test_pf_vae_every_output_matches(pf_case):
    meta, tensors, vae = pf_case
    ours = _pf_outputs(vae, meta, tensors)
    assert set(meta["outputs"]) <= set(ours), sorted(set(meta["outputs"]) - set(ours))
    for name, info in meta["outputs"].items():
        assert list(ours[name].shape) == info["shape"], name
        _close(ours[name], tensors[info["stored_as"]], meta["tolerance"], name)


def test_pf_vae_frame_counts(pf_case):
    """latent_frames / pixel_frames give the frame counts of every recorded encode / decode call."""
    meta, tensors, vae = pf_case
    for name, info in meta["outputs"].items():
        op, source, _ = _pf_call(meta["calls"][name.rsplit(".", 1)[0]])
        count = vae.latent_frames if op == "encode" else vae.pixel_frames
        assert count(tensors[source].shape[2]) == info["shape"][2], name


# ---------------------------------------------------------------------- Neodragon asymmetric VAE


@pytest.fixture
def neo_case(golden_dir):
    folder = golden_dir / ND
    meta, tensors = case(folder)
    return meta, tensors, neodragon_cli.load_component("vae", checkpoint_folder(folder, meta["checkpoint"]))


def _nd_cases(meta):
    return [name for name, entry in meta["case_meta"].items() if isinstance(entry, dict) and "latent_shape" in entry]


def test_neodragon_vae_autodetected(neo_case):
    meta, _, vae = neo_case
    _config_matches(vae, meta["model_config"])
    assert vae.latent_norm == "neodragon"


@pytest.mark.parametrize("name", params(ND, _nd_cases))
def test_neodragon_decode_path(neo_case, name):
    meta, t, vae = neo_case
    info = meta["case_meta"][name]
    tol = meta["tolerance"]["frames"]
    max_diff, max_fraction = uint8_tolerance(meta["tolerance"]["frames_uint8"])
    assert list(t[f"{name}/latents_normalized"].shape) == info["latent_shape"]
    raw = denormalize(t[f"{name}/latents_normalized"], "neodragon")
    _close(raw, t[f"{name}/latents_raw"], tol, "latents_raw")
    with torch.no_grad():
        _close(vae.post_quant_conv(raw), t[f"{name}/post_quant_conv"], tol, "post_quant_conv")
        frames = vae.decode(raw)
        assert list(frames.shape) == info["frames_shape"] and frames.shape[2] == info["num_frames_returned"]
        _close(frames, t[f"{name}/frames"], tol, "frames")
        _close(vae.decode(raw, parallel=False), t[f"{name}/frames"], tol, "frames (sequential)")
        streamed = list(vae.stream_decode(raw.split(1, dim=2)))
        # the decoder emits `temporal_downsample_scale` frames per latent; the first `frames_to_trim` are dropped
        per_latent = meta["model_config"]["temporal_downsample_scale"]
        expected = [per_latent - info["frames_to_trim"]] + [per_latent] * (raw.shape[2] - 1)
        assert [s.shape[2] for s in streamed] == expected
        _close(torch.cat(streamed, dim=2), t[f"{name}/frames"], tol, "frames (streamed)")
    uint8 = to_uint8_frames(frames[0])
    diff = np.abs(uint8.astype(np.int16) - t[f"{name}/frames_uint8"].numpy().astype(np.int16))
    assert diff.max() <= max_diff, f"uint8 frames differ by {diff.max()}"
    assert (diff != 0).mean() <= max_fraction


@pytest.mark.parametrize("name", params(ND, _nd_cases))
def test_neodragon_dropped_frames_are_the_decoders_first_outputs(neo_case, name):
    from neodragon_cli.pipelines.models.taehv import run_stack

    meta, t, vae = neo_case
    info = meta["case_meta"][name]
    raw = t[f"{name}/latents_raw"]
    with torch.no_grad():
        full = run_stack(vae.decoder.blocks, vae.post_quant_conv(raw))
    assert full.shape[2] == meta["model_config"]["temporal_downsample_scale"] * raw.shape[2]
    dropped = full[:, :, : info["frames_to_trim"]]
    _close(dropped, t[f"{name}/decoder_dropped_frames"], meta["tolerance"]["frames"], "dropped frames")


# ---------------------------------------------------------------------- latent normalisation constants


def test_neodragon_normalisation_constants(neo_case):
    meta, _, _ = neo_case
    recorded = meta["case_meta"]["normalisation"]
    scheme = SCHEMES["neodragon"]
    assert scheme.image_scale == recorded["VAE_SCALE_FACTOR"] and scheme.image_shift == recorded["VAE_SHIFT_FACTOR"]
    assert scheme.video_scale == recorded["VAE_VIDEO_SCALE_FACTOR"] and scheme.video_shift == recorded["VAE_VIDEO_SHIFT_FACTOR"]


def _scheduler_float64_atol(meta) -> float:
    """The scheduler fixture's tolerance for float64 entries ('... compare with atol 1e-9 ...')."""
    found = re.search(r"atol ([0-9.eE+-]+)", meta["tolerance"]["exact"])
    assert found, meta["tolerance"]
    return float(found.group(1))


def test_pyramid_flow_normalisation_constants(golden_dir):
    meta = case_json(golden_dir / "pyramid_flow" / "scheduler")
    recorded = meta["latent_normalisation"]
    atol = _scheduler_float64_atol(meta)
    for ours, theirs in (("pyramid-flow", "pyramid_mmdit"), ("pyramid-flow-miniflux", "pyramid_flux_from_source")):
        for field, value in recorded[theirs].items():
            assert getattr(SCHEMES[ours], field) == pytest.approx(value, abs=atol), (ours, field)


@pytest.mark.parametrize("name", params(ND, _nd_cases))
def test_normalise_roundtrips_the_fixture_latents(neo_case, name):
    meta, t, _ = neo_case
    again = normalize(t[f"{name}/latents_raw"], "neodragon")
    torch.testing.assert_close(again, t[f"{name}/latents_normalized"], **{k: meta["tolerance"]["frames"][k] for k in ("atol", "rtol")})
