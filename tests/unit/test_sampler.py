"""Sampler behaviour with stand-in denoisers: call counts, CFG batching and arithmetic, history
layout, hybrid first latent, seeding and noise replay."""

from __future__ import annotations

import pytest
import torch

from neodragon_cli.pipelines.flow.sampler import (
    RowNoise,
    HYBRID,
    MONOLITHIC,
    PyramidSampler,
    RecordedNoise,
    SamplingConfig,
    SeededNoise,
    TextConditioning,
    history_clips,
)
from neodragon_cli.pipelines.flow.scheduler import latent_pyramid, noise_pyramid


def _text(batch=1, value=0.0):
    return TextConditioning(torch.full((batch, 4, 8), value), torch.ones(batch, 4, dtype=torch.long), torch.full((batch, 6), value))


class Recorder:
    """Denoiser returning a fixed velocity per text row (row's first embed value), logging calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, clips, text, timestep):
        self.calls.append(([tuple(c.shape) for c in clips], timestep.clone(), text.embeds[:, 0, 0].clone()))
        return text.embeds[:, 0, 0].view(-1, 1, 1, 1, 1).expand_as(clips[-1]).clone()


def _run(config, frames=7, size=(8, 16), seed=0, first=None, negative=None, denoiser=None, text=None, callback=None):
    denoiser = denoiser or Recorder()
    sampler = PyramidSampler(denoiser)
    out = list(
        sampler.latent_frames(
            text if text is not None else _text(value=1.0), num_frames=frames, latent_channels=4, latent_size=size,
            config=config, noise=SeededNoise(seed), negative=negative, first_latent=first, callback=callback,
        )
    )
    return out, denoiser


def test_call_counts_match_the_paper():
    # hybrid: 6 generated units x 3 stages x 1 step = 18 calls at batch 1
    first = torch.zeros(1, 4, 1, 8, 16)
    _, rec = _run(HYBRID, first=first)
    assert len(rec.calls) == 18 and all(t.shape == (1,) for _, t, _ in rec.calls)
    assert sorted({float(t[0]) for _, t, _ in rec.calls}) == [386.0, 744.0, 1000.0]
    # monolithic: 60 calls for latent 0 plus 6 x 30 = 240 calls at batch 2
    _, rec = _run(MONOLITHIC, negative=_text(value=0.0))
    assert len(rec.calls) == 240 and all(t.shape == (2,) for _, t, _ in rec.calls)


def test_history_clip_shapes_follow_the_temporal_pyramid():
    _, rec = _run(HYBRID, frames=5, first=torch.zeros(1, 4, 1, 8, 16))
    shapes = [[s[2:] for s in clips] for clips, _, _ in rec.calls]
    q, h, f = (1, 2, 4), (1, 4, 8), (1, 8, 16)
    assert shapes[0:3] == [[q, q], [h, h], [f, f]]  # unit 1: one history frame at the stage's size
    assert shapes[3:6] == [[q, q, q], [q, h, h], [h, f, f]]  # unit 2
    assert shapes[9:12] == [[(3, 2, 4), q, q], [(3, 2, 4), h, h], [(2, 2, 4), h, f, f]]  # unit 4


def test_history_clips_direct():
    pyramid = [torch.arange(6.0).view(1, 1, 6, 1, 1).expand(1, 1, 6, s, s) for s in (1, 2, 4)]
    clips = history_clips(pyramid, 2, 5)
    assert [c.shape[2:] for c in clips] == [(3, 1, 1), (1, 2, 2), (1, 4, 4)]
    assert [c[0, 0, :, 0, 0].tolist() for c in clips] == [[0.0, 1.0, 2.0], [3.0], [4.0]]
    assert [c.shape[2] for c in history_clips(pyramid, 0, 5)] == [4, 1]
    assert [c.shape[-1] for c in history_clips(pyramid, 2, 1)] == [4]


def test_cfg_batch_order_and_combination():
    """Rows are [negative, positive]; v = v_neg + g (v_pos - v_neg). With velocities 1 (neg) and 3
    (pos) and g = 2 every step moves by 5 * (sigma_next - sigma); one step per stage from the same
    noise the result differs from the unguided run by exactly that."""
    config = SamplingConfig(first_steps=(1, 1, 1), video_steps=(1, 1, 1), guidance=2.0, video_guidance=2.0)
    guided, rec = _run(config, frames=1, text=_text(value=3.0), negative=_text(value=1.0))
    assert rec.calls[0][2].tolist() == [1.0, 3.0]
    plain = SamplingConfig(first_steps=(1, 1, 1), video_steps=(1, 1, 1), guidance=0.0, video_guidance=0.0)
    unguided, _ = _run(plain, frames=1, text=_text(value=0.0))
    # velocity 5 vs 0 through three stages: x2 = a2 (up(a1 (up(x0 - 5)) + b1 n1 - 5)) + b2 n2 - 5
    sched = PyramidSampler(Recorder()).scheduler
    a1, _ = sched.jump_coefficients(1)
    a2, _ = sched.jump_coefficients(2)
    expected_shift = -5.0 * (a2 * a1 + a2 + 1)
    torch.testing.assert_close(guided[0] - unguided[0], torch.full_like(guided[0], expected_shift), rtol=0, atol=1e-5)


def test_linear_guidance_decays_per_unit():
    config = SamplingConfig(guidance=7.0, video_guidance=5.0, linear_guidance=True, min_guidance=2.0, guidance_decay=2.0)
    assert [config.unit_plan(u)[1] for u in range(5)] == [7.0, 5.0, 3.0, 2.0, 2.0]
    assert MONOLITHIC.unit_plan(0) == ((20, 20, 20), 7.0) and MONOLITHIC.unit_plan(3) == ((10, 10, 10), 5.0)


def test_cfg_without_negative_is_an_error():
    with pytest.raises(ValueError, match="negative"):
        _run(MONOLITHIC, frames=1)


def test_hybrid_yields_given_first_latent_first_and_streams():
    first = torch.randn(1, 4, 1, 8, 16)
    seen = []
    sampler = PyramidSampler(Recorder())
    frames = sampler.latent_frames(
        _text(value=1.0), num_frames=3, latent_channels=4, latent_size=(8, 16), config=HYBRID, noise=SeededNoise(0),
        first_latent=first, callback=lambda e: seen.append((e.unit, e.stage)),
    )
    assert torch.equal(next(frames), first) and seen == []  # nothing computed before it is needed
    next(frames)
    assert seen == [(1, 0), (1, 1), (1, 2)]


def test_seeded_runs_are_reproducible_and_seed_dependent():
    a, _ = _run(HYBRID, frames=3, seed=5, first=torch.zeros(1, 4, 1, 8, 16))
    b, _ = _run(HYBRID, frames=3, seed=5, first=torch.zeros(1, 4, 1, 8, 16))
    c, _ = _run(HYBRID, frames=3, seed=6, first=torch.zeros(1, 4, 1, 8, 16))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[-1], c[-1])
    torch.manual_seed(123)  # the global RNG does not matter
    d, _ = _run(HYBRID, frames=3, seed=5, first=torch.zeros(1, 4, 1, 8, 16))
    assert all(torch.equal(x, y) for x, y in zip(a, d))


def test_recorded_noise_checks_shapes_and_counts():
    noise = RecordedNoise({"initial": [torch.zeros(1, 4, 1, 8, 8)]})
    with pytest.raises(ValueError, match="shape"):
        noise.randn((1, 4, 2, 8, 8), kind="initial")
    noise.randn((1, 4, 1, 8, 8), kind="initial")
    with pytest.raises(ValueError, match="no recorded"):
        noise.randn((1, 4, 1, 8, 8), kind="initial")
    assert noise.remaining() == {}


def test_latent_size_must_fit_the_pyramid():
    with pytest.raises(ValueError, match="divisible"):
        _run(HYBRID, size=(6, 8), first=torch.zeros(1, 4, 1, 6, 8))


def test_profiler_sections_are_exclusive():
    import time as _time

    from neodragon_cli.pipelines.flow.pipeline import Profiler

    profile = Profiler()
    start = _time.perf_counter()
    with profile.section("decoder"):
        _time.sleep(0.02)
        for _ in range(2):
            with profile.section("mmdit"):
                _time.sleep(0.03)
    wall = _time.perf_counter() - start
    decoder, mmdit = profile.components["decoder"], profile.components["mmdit"]
    assert (decoder.calls, mmdit.calls) == (1, 2)
    assert 0.06 <= mmdit.seconds < 0.2 and 0.02 <= decoder.seconds < 0.1  # sleeps never end early
    assert profile.total_seconds() <= wall and decoder.peak_mb > 0


def test_sample_unit_with_the_samplers_own_history_reproduces_it_and_uses_the_history_given():
    def history_aware(clips, text, timestep):  # velocity depends on the newest history clip
        shift = clips[-2].mean() if len(clips) > 1 else 0.0
        return 0.1 * clips[-1] + shift

    config = SamplingConfig(first_steps=(2, 2, 2), video_steps=(2, 2, 2), guidance=0.0, video_guidance=0.0)
    sampler = PyramidSampler(history_aware)
    frames = list(sampler.latent_frames(_text(), num_frames=3, latent_channels=4, latent_size=(8, 16), config=config, noise=SeededNoise(5)))

    def replay(histories):  # the same draws as latent_frames, unit by unit
        noise = SeededNoise(5)
        stage0 = noise_pyramid(noise.randn((1, 4, 3, 8, 16), kind="initial"))[0]
        return [sampler.sample_unit(u, 3, stage0[:, :, u : u + 1], h, _text(), None, config, noise) for u, h in enumerate(histories)]

    assert all(torch.equal(a, b) for a, b in zip(replay([[], frames[:1], frames[:2]]), frames))
    forced = replay([[], frames[:1], [frames[0], frames[1] + 1.0]])
    assert torch.equal(forced[1], frames[1]) and not torch.allclose(forced[2], frames[2])


def test_history_noise_mixes_fresh_noise_into_every_history_clip():
    seen = []

    def logging_denoiser(clips, text, timestep):
        seen.append([c.clone() for c in clips[:-1]])
        return torch.zeros_like(clips[-1])

    first = torch.ones(1, 4, 1, 8, 16)
    sampler = PyramidSampler(logging_denoiser)
    config = SamplingConfig(video_steps=(1, 1, 1), guidance=0.0, video_guidance=0.0, history_noise=0.25)
    list(sampler.latent_frames(_text(), num_frames=2, latent_channels=4, latent_size=(8, 16), config=config,
                               noise=SeededNoise(0), first_latent=first))
    clean = [history_clips([torch.ones(1, 4, 1, 2, 4), torch.ones(1, 4, 1, 4, 8), first], s, 1)[0] for s in range(3)]
    for stage, (histories, ones) in enumerate(zip(seen, clean)):
        (h,) = histories
        eps = (h - 0.75 * ones) / 0.25  # the mixed-in noise: unit variance, not the clean frame
        assert h.shape == ones.shape and 0.5 < eps.std() < 1.5 and abs(eps.mean()) < 0.5, stage
    assert not torch.allclose(seen[1][0].mean(), seen[2][0].mean())  # fresh noise per stage


def test_a_clean_latent_oracle_regenerates_the_video_only_under_clean_prediction():
    """A denoiser that returns the true clean latent of the stage (resolution read from the clip,
    frame from the history length) must make the sampler land on the true latents exactly when the
    sampler knows the output is a clean latent; read as a velocity, the same output does not."""
    true = torch.randn(1, 4, 3, 8, 16, generator=torch.Generator().manual_seed(0))
    levels = latent_pyramid(true)

    def oracle(clips, text, timestep):
        unit = sum(c.shape[2] for c in clips[:-1])
        stage = [level.shape[-2] for level in levels].index(clips[-1].shape[-2])
        return levels[stage][:, :, unit : unit + 1].expand_as(clips[-1]).clone()

    config = SamplingConfig(first_steps=(3, 2, 4), video_steps=(2, 3, 2), guidance=7.0, video_guidance=5.0)

    def generate(prediction):
        sampler = PyramidSampler(oracle, prediction=prediction)
        frames = sampler.latent_frames(_text(value=1.0), negative=_text(value=0.0), num_frames=3, latent_channels=4,
                                       latent_size=(8, 16), config=config, noise=SeededNoise(3))
        return torch.cat(list(frames), dim=2)

    torch.testing.assert_close(generate("clean"), true, atol=1e-4, rtol=0)
    assert (generate("velocity") - true).abs().max() > 0.5
    with pytest.raises(ValueError, match="prediction"):
        PyramidSampler(oracle, prediction="noise")


def test_row_noise_gives_each_row_the_draws_of_its_seed_alone():
    rows = RowNoise([SeededNoise(1), SeededNoise(2)])
    alone = [SeededNoise(1), SeededNoise(2)]
    for kind, shape in (("initial", (2, 3, 4)), ("block", (2, 4, 1, 4, 4)), ("timestep", (2,))):
        if kind == "block":
            together, separate = rows.block_noise(shape, 0.5), [s.block_noise((1, *shape[1:]), 0.5) for s in alone]
        else:
            together, separate = rows.randn(shape, kind=kind), [s.randn((1, *shape[1:]), kind=kind) for s in alone]
        assert torch.equal(together, torch.cat(separate))
    assert not torch.equal(together[0], together[1])
    with pytest.raises(ValueError, match="3 rows from noise for 2 rows"):
        rows.randn((3, 2), kind="initial")
