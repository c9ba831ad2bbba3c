"""Pyramidal schedule: step parsing, per-stage tables, stage jumps, block noise (vectorised)."""

from __future__ import annotations

import math
import time

import pytest
import torch

from neodragon_cli.pipelines.flow.scheduler import (
    PyramidFlowScheduler,
    block_noise_cholesky,
    downsample_2x,
    latent_pyramid,
    noise_pyramid,
    parse_steps,
    sample_block_noise,
    upsample_nearest_2x,
)


@pytest.mark.parametrize(
    "text,expected",
    [("1-1-1", (1, 1, 1)), ("20-20-20", (20, 20, 20)), ("4", (4, 4, 4)), (10, (10, 10, 10)), ([2, 3, 4], (2, 3, 4)), ("4,4,4", (4, 4, 4))],
)
def test_parse_steps(text, expected):
    assert parse_steps(text) == expected


@pytest.mark.parametrize("bad", ["", "1-1", "a-b-c", "0-1-1", "1-1-1-1", "-1", [1, 2], True])
def test_parse_steps_rejects(bad):
    with pytest.raises(ValueError):
        parse_steps(bad)


@pytest.mark.parametrize("steps", [1, 2, 4, 10, 20])
def test_stage_tables_cover_each_stage(steps):
    sched = PyramidFlowScheduler()
    previous_end = None
    for stage in range(3):
        ts, sig = sched.timesteps(steps, stage), sched.sigmas(steps, stage)
        assert len(ts) == steps and len(sig) == steps + 1
        assert sig[0] == 1.0 and sig[-1] == 0.0 and all(a > b for a, b in zip(sig, sig[1:]))
        assert math.isclose(sum(b - a for a, b in zip(sig, sig[1:])), -1.0)  # Euler steps span the stage
        assert all(a >= b for a, b in zip(ts, ts[1:]))
        if previous_end is not None:
            assert ts[0] <= previous_end  # stages follow each other on the global clock
        previous_end = ts[-1]


def test_one_step_schedule_is_neodragon_1000_744_386():
    sched = PyramidFlowScheduler()
    assert [float(sched.timesteps(1, s)[0]) for s in range(3)] == [1000.0, 744.0, 386.0]


def test_stage_jump_continues_the_flow():
    """An end-of-stage latent (noise level E over signal z) jumps to the next stage's corrected start:
    the signal coefficient becomes 1 - S and the noise variance S**2 (computed here from the
    definitions, independently of the jump formula)."""
    sched = PyramidFlowScheduler()
    for stage in (1, 2):
        alpha, beta = sched.jump_coefficients(stage)
        sigma = sched.stages[stage - 1].end_sigma
        start = sched.stages[stage].start_sigma
        assert alpha * (1 - sigma) == pytest.approx(1 - start, abs=1e-6)
        assert alpha**2 * sigma**2 + beta**2 == pytest.approx(start**2, abs=1e-6)


def test_stage_jump_statistics():
    torch.manual_seed(0)
    sched = PyramidFlowScheduler()
    sigma = sched.stages[0].end_sigma
    x = sigma * torch.randn(8, 16, 1, 16, 16)  # pure noise at the end of stage 0
    noise = sample_block_noise((8, 16, 1, 32, 32), generator=torch.Generator().manual_seed(1))
    jumped = sched.stage_jump(x, 1, noise)
    assert jumped.shape == (8, 16, 1, 32, 32)
    assert jumped.std().item() == pytest.approx(sched.stages[1].start_sigma, rel=0.02)


def test_block_noise_covariance_and_zero_block_sums():
    noise = sample_block_noise((4, 16, 2, 32, 32), generator=torch.Generator().manual_seed(0))
    blocks = noise.reshape(4, 16, 2, 16, 2, 16, 2).permute(0, 1, 2, 3, 5, 4, 6).reshape(-1, 4)
    assert blocks.sum(-1).abs().max().item() < 1e-5  # covariance (1+g)I - g11^T with g=1/3 is singular
    cov = torch.cov(blocks.T)
    expected = (4 / 3) * torch.eye(4) - torch.ones(4, 4) / 3
    torch.testing.assert_close(cov, expected, rtol=0, atol=0.02)
    L = block_noise_cholesky()
    torch.testing.assert_close(L @ L.T, expected, rtol=0, atol=1e-6)
    assert torch.equal(L, torch.tril(L))


def test_block_noise_is_vectorised():
    start = time.perf_counter()
    noise = sample_block_noise((1, 16, 7, 40, 64))  # a full Neodragon latent
    assert noise.shape == (1, 16, 7, 40, 64)
    assert time.perf_counter() - start < 0.5


def test_block_noise_needs_even_size():
    with pytest.raises(ValueError):
        sample_block_noise((1, 1, 1, 3, 4))


def test_resampling_helpers():
    x = torch.arange(16.0).reshape(1, 1, 1, 4, 4)
    down = downsample_2x(x)
    torch.testing.assert_close(down, torch.tensor([[[[[2.5, 4.5], [10.5, 12.5]]]]]))
    up = upsample_nearest_2x(down)
    assert up.shape == x.shape and torch.equal(up[..., :2, :2], torch.full((1, 1, 1, 2, 2), 2.5))
    levels = latent_pyramid(torch.randn(2, 3, 5, 16, 8))
    assert [tuple(l.shape[-2:]) for l in levels] == [(4, 2), (8, 4), (16, 8)]
    noisy = noise_pyramid(torch.randn(64, 16, 1, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert [round(l.std().item(), 1) for l in noisy] == [1.0, 1.0, 1.0]  # x2 keeps unit variance


def test_training_point_grid():
    sched = PyramidFlowScheduler()
    r, t = sched.training_point(torch.tensor([0.0, 0.5, 0.9999999]), 1)
    torch.testing.assert_close(r.double(), torch.tensor([1.0, 0.5, 0.001], dtype=torch.float64), atol=1e-7, rtol=0)
    assert t[0].item() == 744.0 and t[-1].item() == pytest.approx(386.358, abs=1e-3)


def test_velocity_from_clean_recovers_every_training_target():
    """Given each sample's true clean latent at its stage, the implied velocity is the training
    target start - end (built by the loss module, independently), and a clean-latent model that
    outputs it has zero flow loss; one that misses it does not."""
    from neodragon_cli.pipelines.flow.losses import build_flow_batch, pyramid_flow_loss
    from neodragon_cli.pipelines.flow.sampler import SeededNoise, TextConditioning

    latents = torch.randn(8, 4, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    text = TextConditioning(torch.zeros(8, 3, 6), torch.ones(8, 3, dtype=torch.long), torch.zeros(8, 5))
    null = TextConditioning(torch.zeros(1, 3, 6), torch.ones(1, 3, dtype=torch.long), torch.zeros(1, 5))
    batch = build_flow_batch(latents, text, null, SeededNoise(2), temporal_pyramid=False)
    sched, levels = PyramidFlowScheduler(), latent_pyramid(latents)
    cleans = [levels[c.stage][c.samples] for c in batch.columns]
    for column, clean in zip(batch.columns, cleans):
        implied = sched.velocity_from_clean(column.clips[-1], clean, column.stage, column.ratios)
        torch.testing.assert_close(implied, column.target, atol=2e-4, rtol=1e-4)

    class CleanModel:
        config = {"prediction": "clean"}

        def __init__(self, offset):
            self.offset = offset

        def __call__(self, **inputs):
            return [clean + self.offset for clean in cleans]

    assert pyramid_flow_loss(CleanModel(0.0), batch).loss < 1e-6
    assert pyramid_flow_loss(CleanModel(0.1), batch).loss > 1e-3
