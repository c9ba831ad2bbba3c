"""Original TAEHV (base variant, `taehv.pth`) against the reference fixture: key layout, encode and
decode in parallel and frame by frame, and the streaming API's event order.

The fixture uses TAEHV's own convention (NTCHW, pixels in [0, 1]); ours is [B, C, T, H, W] with
pixels in [-1, 1], so inputs and outputs are converted here."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import neodragon_cli
from neodragon_cli.pipelines.models.taehv import TAEHV

pytestmark = pytest.mark.golden


@pytest.fixture
def taehv_case(golden_dir):
    folder = golden_dir / "taehv"
    meta = json.loads((folder / "case.json").read_text())
    assert isinstance(neodragon_cli.load_component("vae", folder), TAEHV)  # the folder holding taehv.pth also loads
    model = neodragon_cli.load_component("vae", folder / meta["checkpoint"]["file"])
    return meta, load_file(str(folder / "case.safetensors")), model


def _video_in(ntchw01: torch.Tensor) -> torch.Tensor:
    return ntchw01.transpose(1, 2) * 2 - 1


def _video_out(video: torch.Tensor) -> torch.Tensor:
    return ((video + 1) / 2).transpose(1, 2)


def _close(actual, expected, meta, name):
    tol = meta["tolerance"]
    assert tuple(actual.shape) == tuple(expected.shape), f"{name}: {tuple(actual.shape)} vs {tuple(expected.shape)}"
    torch.testing.assert_close(actual, expected, atol=tol["atol"], rtol=tol["rtol"], msg=lambda m: f"{name}: {m}")


def test_taehv_checkpoint_detected_and_layout(taehv_case):
    meta, _, model = taehv_case
    assert isinstance(model, TAEHV)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == meta["state_dict_shapes"]
    assert sum(p.numel() for p in model.parameters()) == meta["checkpoint"]["num_params"]
    assert (model.temporal_downscale, model.temporal_upscale, model.frames_to_trim) == (
        meta["model"]["t_downscale"], meta["model"]["t_upscale"], meta["model"]["frames_to_trim"],
    )  # fmt: skip


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_taehv_encode(taehv_case, parallel):
    meta, t, model = taehv_case
    with torch.no_grad():
        latents = model.encode(_video_in(t["encode/video"]), parallel=parallel)
    _close(latents.transpose(1, 2), t["encode/latents_parallel" if parallel else "encode/latents_sequential"], meta, "latents")


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_taehv_decode(taehv_case, parallel):
    meta, t, model = taehv_case
    with torch.no_grad():
        video = model.decode(t["decode/latents"].transpose(1, 2), parallel=parallel)
    _close(_video_out(video), t["decode/frames_parallel" if parallel else "decode/frames_sequential"], meta, "frames")


def test_taehv_streaming_matches_reference_events(taehv_case):
    meta, t, model = taehv_case
    video = _video_in(t["encode/video"])
    consumed = 0

    def frames():
        nonlocal consumed
        for frame in video.split(1, dim=2):
            consumed += 1
            yield frame

    with torch.no_grad():
        latents, arrivals = [], []
        for z in model.stream_encode(frames()):
            latents.append(z)
            arrivals.append(consumed)
        # reference log: a latent after frames 3 and 7 (0-based), the last one from flush_encoder()
        assert arrivals == [4, 8, 9] and all(z.shape[2] == 1 for z in latents)
        _close(torch.cat(latents, dim=2).transpose(1, 2), t["stream/latents"], meta, "streamed latents")

        decoded = list(model.stream_decode(t["decode/latents"].transpose(1, 2).split(1, dim=2)))
    assert [f.shape[2] for f in decoded] == [1, 4, 4]  # decode(latent i) -> 1, 4, 4 frames
    _close(_video_out(torch.cat(decoded, dim=2)), t["stream/frames"], meta, "streamed frames")
