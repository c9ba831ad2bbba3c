"""`step-distill` building blocks on tiny real-architecture MMDiTs: the clean-latent readout inverts the
flow loss's construction, the DMD gradient equals its definition on a hand case, the student's rollout
stops at exactly the sampler's call, progressive's teacher endpoint is the sampler run with the
quantised schedule, and the schedule / teacher-grid rule; mean-flows: the JVP target equals a finite-difference
total derivative, r = t is the plain flow target, the exact average velocity of a linear flow is a fixed
point, the student starts as the teacher and saves / loads its step embedding, and the sampler gives it the
end of every step."""

from __future__ import annotations

import json

import pytest
import torch
from neodragon_cli import load_component
from neodragon_cli.errors import UsageError
from neodragon_cli.pipelines.distill.step_distill import (
    DistillContext,
    StepDistillRecipe,
    TrainingPoint,
    make_student,
    spans_teacher_grid,
    student_rollout,
    teacher_endpoint,
    teacher_span,
)
from neodragon_cli.pipelines.distill.step_distill_dmd import (
    cauchy_loss,
    dmd_gradient,
    dmd_loss,
)
from neodragon_cli.pipelines.distill.step_distill_meanflows import (
    average_velocity,
    draw_times,
    mean_flow_target,
)
from neodragon_cli.pipelines.flow.losses import build_flow_batch
from neodragon_cli.pipelines.flow.sampler import (
    PyramidSampler,
    SeededNoise,
    TextConditioning,
    mmdit_denoiser,
)
from neodragon_cli.pipelines.flow.scheduler import PyramidFlowScheduler, latent_pyramid
from neodragon_cli.pipelines.flow.settings import SamplingConfig
from neodragon_cli.pipelines.models.mmdit import PyramidFlowMMDiT
from test_prune import tiny_mmdit

pytestmark = pytest.mark.usefixtures("one_thread")


def text(rows: int = 2) -> TextConditioning:
    g = torch.Generator().manual_seed(5)
    return TextConditioning(torch.randn(rows, 3, 16, generator=g), torch.ones(rows, 3, dtype=torch.long), torch.zeros(rows, 0))


def context(schedule=(4, 4, 4), teacher_steps=16, guidance=(3.0, 2.0), history_noise=0.0) -> DistillContext:
    return DistillContext(recipe=StepDistillRecipe(), scheduler=PyramidFlowScheduler(), schedule=schedule,
                          teacher_steps=teacher_steps, guidance=guidance, history_noise=history_noise, num_units=3,
                          latent_channels=16, latent_size=(8, 8), negative_prompt="")


def test_clean_readout_inverts_the_flow_targets_and_stage_point_builds_them():
    """On the flow loss's own columns (built independently), the clean latent a target velocity implies
    is the column's clean latent; and `stage_point` of that latent lies on the same path."""
    latents = torch.randn(8, 4, 2, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cond = TextConditioning(torch.zeros(8, 3, 6), torch.ones(8, 3, dtype=torch.long), torch.zeros(8, 5))
    null = TextConditioning(torch.zeros(1, 3, 6), torch.ones(1, 3, dtype=torch.long), torch.zeros(1, 5))
    batch = build_flow_batch(latents, cond, null, SeededNoise(2), temporal_pyramid=False)
    sched, levels = PyramidFlowScheduler(), latent_pyramid(latents)
    for column in batch.columns:
        clean = levels[column.stage][column.samples]
        x, r = column.clips[-1], column.ratios.double()
        torch.testing.assert_close(sched.clean_from_velocity(x, column.target, column.stage, r), clean, atol=1e-6, rtol=0)  # float32 ratios
        # the noise that made x: recovered through the path's end, then rebuilt by stage_point
        noise = torch.randn_like(clean)
        x2, v2 = sched.stage_point(clean, noise, column.stage, r)
        torch.testing.assert_close(sched.velocity_from_clean(x2, clean, column.stage, r), v2, atol=1e-9, rtol=0)
        torch.testing.assert_close(sched.clean_from_velocity(x2, v2, column.stage, r), clean, atol=1e-9, rtol=0)
    assert {c.stage for c in batch.columns} == {0, 1, 2}


def test_dmd_gradient_equals_its_definition_on_a_hand_case():
    generated = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    real = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    fake = torch.tensor([[1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    # by hand: mean|x - real| = 1.5 and 2.5; g = (fake - real) / that
    expected = torch.tensor([[1 / 1.5, 1 / 1.5], [-1 / 2.5, 1 / 2.5]], dtype=torch.float64)
    gradient = dmd_gradient(generated.detach(), real, fake)
    torch.testing.assert_close(gradient, expected)
    loss = dmd_loss(generated, gradient)
    loss.backward()
    torch.testing.assert_close(generated.grad, expected.float().double() / 4, atol=1e-7, rtol=0)  # d/dx = g / numel
    assert float(loss.detach()) == pytest.approx(0.5 * float((expected**2).mean()), rel=1e-6)
    # a real prediction equal to the sample: the weight is floored, the gradient stays finite
    assert torch.isfinite(dmd_gradient(real, real, fake)).all()
    assert float(cauchy_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0]), 2.0)) == pytest.approx(
        (torch.log1p(torch.tensor(0.25)) + torch.log1p(torch.tensor(1.0))).item() / 2)


@pytest.mark.parametrize("student, ok", [(1, True), (2, True), (4, True), (6, True), (16, True), (3, False), (5, False),
                                         (8, False), (17, False)])
def test_a_student_step_must_span_whole_teacher_steps(student, ok):
    assert spans_teacher_grid(student, 16) is ok
    sched = PyramidFlowScheduler()
    if ok:
        teacher_sigmas, student_sigmas = sched.sigmas(16, 1), sched.sigmas(student, 1)
        for k in range(student):
            first, end = teacher_span(student, 16, k)
            assert teacher_sigmas[first] == pytest.approx(student_sigmas[k]) and teacher_sigmas[end] == pytest.approx(student_sigmas[k + 1])


def test_recipe_rejects_what_cannot_run():
    assert StepDistillRecipe(method="progressive", schedule="4-4-4").validate() == []
    problems = StepDistillRecipe(method="progressive", schedule="3-3-3").validate()
    assert len(problems) == 1 and "do not divide the teacher's 16" in problems[0]
    assert "unknown method 'lcm'" in StepDistillRecipe(method="lcm").validate()[0]
    assert StepDistillRecipe(method="dmd", schedule="3-3-3").validate() != []  # its teacher loss runs on the grid
    no_teacher_loss = StepDistillRecipe(method="dmd", schedule="3-3-3")
    no_teacher_loss.dmd.w_teacher = 0.0
    assert no_teacher_loss.validate() == []  # DMD alone needs no teacher grid


def sampler_events(model, config: SamplingConfig, seed: int, units: int = 2) -> list:
    events = []
    sampler = PyramidSampler(mmdit_denoiser(model), prediction="velocity")
    negative = TextConditioning(torch.zeros(2, 3, 16), torch.ones(2, 3, dtype=torch.long), torch.zeros(2, 0))
    with torch.no_grad():
        list(sampler.latent_frames(text(), num_frames=units, latent_channels=16, latent_size=(8, 8), config=config,
                                   noise=SeededNoise(seed), negative=negative, callback=events.append))
    return events


@pytest.mark.parametrize("schedule, step", [((4, 4, 4), 1), ((4, 4, 4), 3), ((1, 1, 1), 0)])
def test_progressive_teacher_endpoint_is_the_sampler_with_the_quantised_schedule(schedule, step):
    teacher = tiny_mmdit()
    ctx = context(schedule=schedule)
    quantised = SamplingConfig(first_steps=(16, 16, 16), video_steps=(16, 16, 16), guidance=3.0, video_guidance=2.0)
    events = [e for e in sampler_events(teacher, quantised, seed=4) if e.unit == 1 and e.stage == 1]
    first, end = teacher_span(schedule[1], 16, step)
    start = events[first]
    point = TrainingPoint(1, 1, step, list(start.history) + [start.latents_in], torch.full((2,), start.timestep), start.sigma)
    negative = TextConditioning(torch.zeros(2, 3, 16), torch.ones(2, 3, dtype=torch.long), torch.zeros(2, 0))
    landed = teacher_endpoint(ctx, teacher, point, text(), negative)
    torch.testing.assert_close(landed, events[end - 1].latents_out, atol=1e-6, rtol=1e-6)
    assert start.sigma == pytest.approx(float(PyramidFlowScheduler().sigmas(schedule[1], 1)[step]))


@pytest.mark.parametrize("place", [(0, 0, 0), (1, 2, 3), (2, 1, 2)])
def test_student_rollout_stops_at_the_samplers_own_call(place):
    student = tiny_mmdit(seed=1)
    ctx = context(history_noise=0.2)
    unit = place[0]
    events = sampler_events(student, ctx.student_config(), seed=9, units=unit + 1)  # the rollout draws noise for unit + 1 frames
    event = next(e for e in events if (e.unit, e.stage, e.step) == place)
    point = student_rollout(ctx, student, text(), place, SeededNoise(9))
    torch.testing.assert_close(point.latents, event.latents_in, atol=0, rtol=0)
    assert len(point.history) == len(event.history) and all(torch.equal(a, b) for a, b in zip(point.history, event.history))
    assert float(point.timestep[0]) == event.timestep and point.ratio == pytest.approx(event.sigma)


# ---------------------------------------------------------------------------------------------- mean-flows


def tiny_interval_mmdit(seed: int = 3):
    """A tiny Mean-Flows MMDiT with random weights everywhere, the step-length embedding included."""
    torch.manual_seed(seed)
    model = PyramidFlowMMDiT(sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                             pooled_projection_dim=0, pos_embed_max_size=16, joint_attention_dim=16, interval_conditioning=True)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        for p in model.time_text_embed.parameters():  # std 0.02 as initialised: t-derivatives of the size of the x ones
            p.mul_(0.1)
    return model.eval()


def test_mean_flow_target_is_the_finite_difference_total_derivative():
    """u_tgt = v - (t - r) du/dt with du/dt = v . d_x u + d_t u (r fixed), in the stage's local time,
    against a central difference of u along (v, 1, 0); leaving out d_t u would be caught."""
    model, sched, stage = tiny_interval_mmdit(), PyramidFlowScheduler(), 1
    g = torch.Generator().manual_seed(0)
    history = [torch.randn(2, 16, 1, 4, 4, generator=g)]
    x, v = torch.randn(2, 16, 1, 8, 8, generator=g), torch.randn(2, 16, 1, 8, 8, generator=g)
    t, r = torch.tensor([0.8, 0.5]), torch.tensor([0.1, 0.0])
    u = average_velocity(model, history, text(), sched, stage)
    target, dudt = mean_flow_target(u, x, t, r, v)
    delta = 3e-4
    with torch.no_grad():
        finite = (u(x + delta * v, t + delta, r) - u(x - delta * v, t - delta, r)) / (2 * delta)
        spatial_only = (u(x + delta * v, t, r) - u(x - delta * v, t, r)) / (2 * delta)
        along_r = (u(x, t, r + delta) - u(x, t, r - delta)) / (2 * delta)
    gap = (t - r).view(-1, 1, 1, 1, 1)
    tolerance = 2e-3 * float(finite.abs().max())
    torch.testing.assert_close(dudt, finite, atol=tolerance, rtol=0)
    torch.testing.assert_close(target, v - gap * finite, atol=tolerance, rtol=0)
    # what a wrong tangent would change is far above the tolerance: d_t u (t tangent 0), d_r u (r tangent 1)
    assert float((finite - spatial_only).abs().max()) > 50 * tolerance and float(along_r.abs().max()) > 50 * tolerance
    assert not target.requires_grad


def test_r_equal_to_t_is_the_plain_flow_target_and_draw_times_mixes_the_two():
    model, sched = tiny_interval_mmdit(), PyramidFlowScheduler()
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(3, 16, 1, 8, 8, generator=g), torch.randn(3, 16, 1, 8, 8, generator=g)
    t = torch.tensor([0.9, 0.4, 0.05])
    target, _ = mean_flow_target(average_velocity(model, [], text(3), sched, 2), x, t, t, v)
    assert torch.equal(target, v)
    ctx = context(schedule=(4, 4, 4))
    sigmas = sched.sigmas(4, 1)
    for fraction in (0.0, 1.0, 0.25):
        ctx.recipe.mean_flows.fraction = fraction
        t, r = draw_times(ctx, 1, 2, 4000, torch.Generator().manual_seed(2))
        mean_flow = r != t
        assert float(mean_flow.float().mean()) == pytest.approx(fraction, abs=0.02)
        assert torch.all(r[mean_flow] == float(sigmas[3])) and torch.all(t[mean_flow] > r[mean_flow])
        assert torch.all(t[mean_flow] <= float(sigmas[2]))  # the student step's interval (end, start]
        assert torch.all((t[~mean_flow] >= 0) & (t[~mean_flow] <= 1))


def test_the_exact_average_velocity_of_a_linear_flow_is_a_fixed_point_of_the_target():
    """dx/dsigma = a x: the average velocity of the step from t to r is x (e^{a (r - t)} - 1) / (r - t), and an
    Euler step of it, x + (r - t) u, is the exact flow; the Mean-Flows target of that u is u itself."""
    a = torch.tensor(0.7, dtype=torch.float64)
    u = lambda x, t, r: x * torch.expm1(a * (r - t)).view(-1, 1) / (r - t).view(-1, 1)  # noqa: E731
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t, r = torch.tensor([1.0, 0.6, 0.3], dtype=torch.float64), torch.tensor([0.0, 0.2, 0.1], dtype=torch.float64)
    target, _ = mean_flow_target(u, x.double(), t, r, a * x)
    torch.testing.assert_close(target.double(), u(x, t, r).float().double(), atol=1e-5, rtol=1e-5)
    wrong_sign, _ = mean_flow_target(u, x, r, t, a * x)  # a target with (r, t) swapped is not one
    assert float((wrong_sign.double() - u(x, t, r)).abs().max()) > 1e-2


def test_a_mean_flows_student_starts_as_its_teacher_and_saves_its_step_embedding(tmp_path):
    teacher = tiny_mmdit()
    torch.manual_seed(4)
    student = make_student(teacher, "velocity", interval=True).eval()
    g = torch.Generator().manual_seed(5)
    clips = [torch.randn(2, 16, 1, 4, 4, generator=g), torch.randn(2, 16, 1, 8, 8, generator=g)]
    t = torch.tensor([700.0, 500.0])
    with torch.no_grad():
        expected = mmdit_denoiser(teacher)(clips, text(), t)
        for end in (t, torch.tensor([400.0, 386.0])):
            assert torch.equal(mmdit_denoiser(student)(clips, text(), t, end), expected)
    assert mmdit_denoiser(student).takes_step_end and not mmdit_denoiser(teacher).takes_step_end
    with pytest.raises(UsageError, match="needs timestep_end"):
        mmdit_denoiser(student)(clips, text(), t)  # e.g. an exporter's call: loud, not a silent r = t
    student.save_pretrained(tmp_path / "student")
    teacher.save_pretrained(tmp_path / "teacher")
    loaded = load_component("mmdit", tmp_path / "student")
    assert loaded.interval_conditioning and loaded.config["interval_conditioning"] is True
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), student.state_dict().values()))
    assert "interval_conditioning" not in json.loads((tmp_path / "teacher" / "config.json").read_text())


@pytest.mark.parametrize("schedule", [(1, 1, 1), (4, 2, 1)])
def test_the_sampler_gives_a_mean_flows_denoiser_the_end_of_every_step(schedule):
    sched, calls = PyramidFlowScheduler(), []

    def denoiser(clips, cond, t, end):
        calls.append((float(t[0]), float(end[0])))
        return torch.zeros_like(clips[-1])

    denoiser.takes_step_end = True
    config = SamplingConfig(first_steps=schedule, video_steps=schedule, guidance=0.0, video_guidance=0.0)
    list(PyramidSampler(denoiser, sched).latent_frames(text(1), num_frames=1, latent_channels=16, latent_size=(8, 8),
                                                       config=config, noise=SeededNoise(0)))
    expected = [(sched.timesteps(n, s)[k], sched.timestep_at(s, float(sched.sigmas(n, s)[k + 1])))
                for s, n in enumerate(schedule) for k in range(n)]
    assert len(calls) == len(expected)
    assert [c for pair in calls for c in pair] == pytest.approx([float(e) for pair in expected for e in pair], rel=1e-6)
    if schedule == (1, 1, 1):  # one jump per stage: from the stage's start to its end
        assert [end for _, end in calls] == pytest.approx([744.0, 386.0, 1.0])
        assert [t for t, _ in calls] == pytest.approx([sched.timestep_at(s, 1.0) for s in range(3)])
