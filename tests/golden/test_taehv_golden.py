"""Original TAEHV (base variant, `taehv.pth`) against the reference fixture: key layout, encode and
decode in parallel and frame by frame, and the streaming API's event order.

The fixture uses TAEHV's own convention (NTCHW, pixels in [0, 1]); ours is [B, C, T, H, W] with
pixels in [-1, 1], so inputs and outputs are converted here."""

from __future__ import annotations

import re

import pytest
import torch
from golden_case import case

import neodragon_cli

pytestmark = pytest.mark.golden


@pytest.fixture
def taehv_case(golden_dir):
    folder = golden_dir / "taehv"
    meta, tensors = case(folder)
    model = neodragon_cli.load_component("vae", folder / meta["checkpoint"]["file"])
    assert type(neodragon_cli.load_component("vae", folder)) is type(model)  # the folder holding the file also loads
    return meta, tensors, model


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
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == meta["state_dict_shapes"] and len(shapes) == meta["checkpoint"]["num_tensors"]
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


def _expected_arrivals(events, prefix, flush, total):
    """{inputs consumed: outputs produced} from the reference's streaming event log: 'encode(frame i) ->
    latent' / 'decode(latent i) -> n frames' happen once input i was consumed, a flush after all."""
    arrivals = {}
    for event in events:
        step = re.fullmatch(rf"{prefix}\((?:frame|latent) (\d+)\) -> (None|latent|(\d+) \w+)", event)
        done = re.fullmatch(rf"{flush}\(\) -> (\d+) \w+", event)
        if step and step.group(2) != "None":
            count = 1 if step.group(2) == "latent" else int(step.group(3))
            consumed = int(step.group(1)) + 1
        elif done:
            count, consumed = int(done.group(1)), total
        else:
            assert step or not event.startswith((prefix, flush)), f"unreadable event {event!r}"
            continue
        if count:
            arrivals[consumed] = arrivals.get(consumed, 0) + count
    return arrivals


def _stream(generator_of, chunks):
    """Run a streaming generator over `chunks` (split on time), recording outputs per chunks consumed."""
    consumed = 0

    def feed():
        nonlocal consumed
        for chunk in chunks:
            consumed += 1
            yield chunk

    outputs, arrivals = [], {}
    for out in generator_of(feed()):
        outputs.append(out)
        arrivals[consumed] = arrivals.get(consumed, 0) + out.shape[2]
    return outputs, arrivals


def test_taehv_streaming_matches_reference_events(taehv_case):
    meta, t, model = taehv_case
    events = meta["case_meta"]["stream"]["events"]
    video = _video_in(t["encode/video"])
    latents_in = t["decode/latents"].transpose(1, 2)
    with torch.no_grad():
        latents, arrivals = _stream(model.stream_encode, video.split(1, dim=2))
        assert arrivals == _expected_arrivals(events, "encode", "flush_encoder", video.shape[2])
        assert sum(arrivals.values()) == meta["case_meta"]["stream"]["num_latents"]
        _close(torch.cat(latents, dim=2).transpose(1, 2), t["stream/latents"], meta, "streamed latents")

        decoded, arrivals = _stream(model.stream_decode, latents_in.split(1, dim=2))
    assert arrivals == _expected_arrivals(events, "decode", "flush_decoder", latents_in.shape[2])
    assert sum(arrivals.values()) == meta["case_meta"]["stream"]["num_frames"]
    _close(_video_out(torch.cat(decoded, dim=2)), t["stream/frames"], meta, "streamed frames")
