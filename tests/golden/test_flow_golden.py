"""Pyramidal flow engine against the reference fixtures: scheduler tables (exact), block-noise
layout, the generation loops replayed from recorded noise (with the recorded DiT outputs, and end to
end with our models when their checkpoints load), and the training-loss construction.

Schedules, step counts, guidance, unit and stage structure, latent shapes, prompts and tolerances are
read from the fixtures' case.json and case.safetensors, so the tests hold for any fixture set."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from golden_case import case, params, tol, uint8_tolerance

import neodragon_cli

from neodragon_cli.pipelines.flow.losses import build_flow_batch, flow_matching_loss, stage_unit_counts
from neodragon_cli.pipelines.flow.sampler import PyramidSampler, RecordedNoise, SamplingConfig, TextConditioning
from neodragon_cli.pipelines.flow.scheduler import PyramidFlowScheduler, arrange_blocks, block_noise_cholesky

pytestmark = pytest.mark.golden


def _case(folder):
    return case(folder)


def _scheduler_tolerances(meta) -> tuple[float, float]:
    """(float64 atol, float32 atol) from the scheduler fixture's tolerance sentence
    'float64 values are exact; compare with atol 1e-9 (float32 entries: 1e-6)'."""
    text = meta["tolerance"]["exact"]
    f64 = re.search(r"atol ([0-9.eE+-]+)", text)
    f32 = re.search(r"float32 entries: ([0-9.eE+-]+)", text)
    assert f64 and f32, f"cannot read the scheduler tolerance from {text!r}"
    return float(f64.group(1)), float(f32.group(1))


def _scheduler(golden_dir) -> PyramidFlowScheduler:
    """The reference scheduler as the scheduler fixture constructed it (its case.json says the
    pipeline's own scheduler is identical)."""
    meta = _case(golden_dir / "pyramid_flow" / "scheduler")[0]
    return PyramidFlowScheduler(**{k: meta["constructor"][k] for k in ("num_train_timesteps", "stages", "stage_range", "gamma")})


# ---------------------------------------------------------------------- scheduler


def test_scheduler_tables_exact(golden_dir):
    meta, tensors = _case(golden_dir / "pyramid_flow" / "scheduler")
    f64, f32 = _scheduler_tolerances(meta)
    sched = _scheduler(golden_dir)
    assert sched.num_stages == meta["constructor"]["stages"] == len(meta["stages"])
    np.testing.assert_allclose(sched.global_timesteps, tensors["global.timesteps"].numpy(), rtol=0, atol=f64)
    np.testing.assert_allclose(sched.global_sigmas, tensors["global.sigmas"].numpy(), rtol=0, atol=f64)
    for i, expected in enumerate(meta["stages"]):
        stage = sched.stages[i]
        assert stage.start_sigma == pytest.approx(expected["start_sigma"], abs=f64)
        assert stage.end_sigma == pytest.approx(expected["end_sigma"], abs=f64)
        assert stage.ori_start_sigma == pytest.approx(expected["ori_start_sigma"], abs=f64)
        np.testing.assert_allclose(stage.timestep_ratio, expected["timestep_ratio"], rtol=0, atol=f64)
        np.testing.assert_allclose(stage.timesteps, tensors[f"stage{i}.timesteps_per_stage"].numpy(), rtol=0, atol=f64)
        np.testing.assert_allclose(stage.sigmas, tensors[f"stage{i}.sigmas_per_stage"].numpy(), rtol=0, atol=f64)
        for n, steps in expected["set_timesteps"].items():
            ts, sig = sched.timesteps(int(n), i), sched.sigmas(int(n), i)
            np.testing.assert_allclose(ts, tensors[f"stage{i}.set_timesteps_{n}.timesteps"].numpy(), rtol=0, atol=f64)
            np.testing.assert_allclose(sig, tensors[f"stage{i}.set_timesteps_{n}.sigmas"].numpy(), rtol=0, atol=f64)
            fed = np.float32(steps["timesteps_as_fed_to_dit_float32"])
            np.testing.assert_allclose(ts.astype(np.float32), fed, rtol=0, atol=f32)
            np.testing.assert_allclose(np.diff(sig), steps["euler_dt"], rtol=0, atol=f64)


@pytest.mark.parametrize("fixture", ["scheduler", "generate"])
def test_stage_jump_and_block_noise_covariance(golden_dir, fixture):
    f64, f32 = _scheduler_tolerances(_case(golden_dir / "pyramid_flow" / "scheduler")[0])
    meta, _ = _case(golden_dir / "pyramid_flow" / fixture)
    sched = _scheduler(golden_dir)
    for jump in meta.get("stage_jumps", []):
        alpha, beta = sched.jump_coefficients(jump["stage"])
        assert alpha == pytest.approx(jump["alpha"], abs=f64) and beta == pytest.approx(jump["beta"], abs=f64)
    noise = meta["block_noise"]
    tril = block_noise_cholesky(noise["gamma"]).numpy()
    np.testing.assert_allclose(tril, noise["scale_tril_used"], rtol=0, atol=f32)  # float32 entries


def test_block_noise_layout(golden_dir):
    meta, tensors = _case(golden_dir / "pyramid_flow" / "generate")
    block_draws = [n["name"] for n in meta["noise"] if "block_noise" in n["name"]]
    for i, name in enumerate(block_draws):
        raw = tensors[f"debug.block_noise_raw.{i:03d}"]  # [blocks, 4] in (b, c, t, h/2, w/2) order
        b, c, t, h, w = tensors[name].shape
        # a pure index permutation of recorded draws (no arithmetic): exact on any fixture set
        torch.testing.assert_close(arrange_blocks(raw.reshape(b, c, t, h // 2, w // 2, 4)), tensors[name], rtol=0, atol=0)


# ---------------------------------------------------------------------- generation loops


class _RecordedDenoiser:
    """Stands in for the DiT: checks the inputs the sampler gives it against the recorded ones (within
    the case's tolerance) and returns the recorded output of that call (so the sampler's own arithmetic
    is what is tested)."""

    def __init__(self, calls, tolerance):
        self.calls = iter(calls)  # (history clips, current input, timestep, output)
        self.tolerance = tolerance
        self.count = 0

    def __call__(self, clips, text, timestep):
        history, current, t, output = next(self.calls)
        assert len(clips) == len(history) + 1
        for got, want in zip(clips, history):
            torch.testing.assert_close(got, want, **self.tolerance)
        torch.testing.assert_close(clips[-1], current, **self.tolerance)
        np.testing.assert_allclose(timestep.numpy(), t, rtol=self.tolerance["rtol"], atol=self.tolerance["atol"])
        self.count += 1
        return output


def _pyramid_flow_generate(golden_dir):
    meta, tensors = _case(golden_dir / "pyramid_flow" / "generate")

    def text(which):
        spec = meta["text"][which]
        return TextConditioning(*(tensors[spec[k]] for k in ("prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds")))

    kw = meta["generate_kwargs"]
    (initial,) = [n for n in meta["noise"] if "initial" in n["name"]]
    _, channels, frames, height, width = initial["shape"]  # one full-resolution draw for the whole video
    assert frames == kw["temp"]
    noise = RecordedNoise(
        {
            "initial": [tensors[initial["name"]]],
            "block": [tensors[n["name"]] for n in meta["noise"] if "block_noise" in n["name"]],
        }
    )
    config = SamplingConfig(
        first_steps=tuple(kw["num_inference_steps"]), video_steps=tuple(kw["video_num_inference_steps"]),
        guidance=kw["guidance_scale"], video_guidance=kw["video_guidance_scale"],
    )
    histories = {(u["unit"], s["stage"]): s["history"] for u in meta["units"] for s in u["stages"]}
    calls = []
    for call in meta["dit_calls"]:
        history = [tensors[k] for k in histories[call["unit"], call["stage"]]]
        assert len(history) == len(call["sample_shapes"][0]) - 1
        step = f"unit{call['unit']}.stage{call['stage']}.step{call['step']}"
        calls.append((history, tensors[f"{step}.dit_input_current"], call["timestep_ratio"], tensors[f"{step}.dit_output"]))
    run = dict(
        text=text("positive"), negative=text("negative"), num_frames=frames, latent_channels=channels,
        latent_size=(height, width), config=config, noise=noise,
    )
    tolerance = dict(atol=meta["tolerance"]["per_step_atol"], rtol=0.0)
    return meta, tensors, calls, run, tolerance


def _collect(sampler, run, tensors, key):
    errors = []

    def check(event):
        errors.append((event.latents_out - tensors[key(event)]).abs().max().item())

    latents = torch.cat(list(sampler.latent_frames(run.pop("text"), callback=check, **run)), dim=2)
    return latents, max(errors)


def test_pyramid_flow_generate_loop_with_recorded_dit_outputs(golden_dir):
    meta, tensors, calls, run, tolerance = _pyramid_flow_generate(golden_dir)
    denoiser = _RecordedDenoiser(calls, tolerance)
    noise = run["noise"]
    latents, step_err = _collect(
        PyramidSampler(denoiser, _scheduler(golden_dir)), run, tensors,
        lambda e: f"unit{e.unit}.stage{e.stage}.step{e.step}.latents_after",
    )
    assert denoiser.count == len(calls) and noise.remaining() == {}
    assert step_err <= meta["tolerance"]["per_step_atol"]
    torch.testing.assert_close(latents, tensors["generated_latents"], rtol=0, atol=meta["tolerance"]["latents_atol"])


GENERATE = "neodragon/hybrid_generate"
_UNIT_EVENT = re.compile(r"unit (\d+) start, steps=\[([\d, ]*)\]")
_DIT_EVENT = re.compile(r"dit unit(\d+) stage(\d+) step(\d+) t=\[[^\]]*\] clips=\[(.*)\]")


def _modes(meta):
    return [mode for mode, entry in meta["case_meta"].items() if isinstance(entry, dict) and "events" in entry]


def _guidance(tensors, steps):
    """The CFG scale the reference used, fitted from its recorded [negative, positive] DiT outputs and
    guided velocity (guided = neg + s (pos - neg)); all steps of one kind share it."""
    scales = []
    for step in steps:
        neg, pos = tensors[step + "dit_output"].double().unbind(0)
        guided, delta = tensors[step + "guided_velocity"].double()[0], pos - neg
        scales.append(((guided - neg) * delta).sum().item() / (delta * delta).sum().item())
    assert max(scales) - min(scales) <= 1e-4 * max(abs(s) for s in scales), scales
    return sum(scales) / len(scales)


def _neodragon_run(golden_dir, mode):
    """The reference run of `mode` rebuilt from its event log, recorded draws and tensors."""
    meta, tensors = _case(golden_dir / GENERATE)
    p = f"{mode}/"
    events = meta["case_meta"][mode]["events"]
    draws = {"initial": [], "block": [], "posterior": []}
    for name in meta["case_meta"][mode]["noise_order"]:
        kind = "initial" if "initial" in name else "posterior" if "posterior" in name else "block"
        draws[kind].append(tensors[f"{p}noise/{name}"])
    final = tensors[f"{p}final_latents"]
    batch, channels, frames, height, width = final.shape
    unit_steps = {int(m[1]): tuple(int(x) for x in m[2].split(",")) for e in events if (m := _UNIT_EVENT.match(e))}
    dit = [(int(m[1]), int(m[2]), int(m[3]), m[4]) for e in events if (m := _DIT_EVENT.fullmatch(e))]
    later = {steps for unit, steps in unit_steps.items() if unit > 0}
    assert len(later) == 1, f"units after the first use different steps: {unit_steps}"
    (video_steps,) = later
    first_given = 0 not in unit_steps  # hybrid: latent 0 comes from the first-frame image
    cfg = int(re.match(r"\[(\d+)", dit[0][3])[1]) == 2 * batch  # [negative, positive] rows per DiT call
    step_keys = lambda units: [f"{p}unit{u}/stage{s}/step{j}/" for u, s, j, _ in dit if u in units]  # noqa: E731
    guidance = video_guidance = 0.0
    if cfg:
        video_guidance = _guidance(tensors, step_keys({u for u in unit_steps if u > 0}))
        guidance = _guidance(tensors, step_keys({0})) if not first_given else video_guidance
    config = SamplingConfig(
        first_steps=unit_steps.get(0, video_steps), video_steps=video_steps, guidance=guidance, video_guidance=video_guidance,
    )  # fmt: skip
    t5_mask = tensors[f"{p}text/positive/t5_attention_mask"]
    pooled = lambda which: torch.cat([tensors[f"{p}text/{which}/clip_l_pooled"], tensors[f"{p}text/{which}/clip_g_pooled"]], -1)  # noqa: E731
    assert pooled("positive").shape[-1] == sum(meta["clip_dims"])
    embeds = tensors[f"{p}text/encoder_hidden_states"]
    if cfg:  # the adapter output rows are [negative, positive]
        text = TextConditioning(embeds[1:], t5_mask, pooled("positive"))
        negative = TextConditioning(embeds[:1], tensors[f"{p}text/negative/t5_attention_mask"], pooled("negative"))
    else:
        text, negative = TextConditioning(embeds, t5_mask, pooled("positive")), None
    calls = []
    for u, s, j, _ in dit:
        stage = f"{p}unit{u}/stage{s}/"
        names = [k for k in tensors if re.fullmatch(re.escape(stage) + r"history\d+", k)]
        history = [tensors[k] for k in sorted(names, key=lambda k: int(k[len(stage) + len("history"):]))]
        step = f"{stage}step{j}/"
        calls.append((history, tensors[step + "dit_input"], tensors[step + "timestep"].numpy(), tensors[step + "dit_output"]))
    run = dict(
        text=text, negative=negative, first_latent=tensors[f"{p}unit0/final"] if first_given else None,
        num_frames=frames, latent_channels=channels, latent_size=(height, width), config=config,
        noise=RecordedNoise(draws),
    )
    return meta, tensors, calls, run


@pytest.mark.parametrize("mode", params(GENERATE, _modes))
def test_neodragon_generate_loop_with_recorded_dit_outputs(golden_dir, mode):
    meta, tensors, calls, run = _neodragon_run(golden_dir, mode)
    tolerance = tol(meta["tolerance"]["latents"])
    denoiser = _RecordedDenoiser(calls, tolerance)
    noise = run["noise"]
    first_given = run["first_latent"] is not None
    latents, step_err = _collect(
        PyramidSampler(denoiser), run, tensors, lambda e: f"{mode}/unit{e.unit}/stage{e.stage}/step{e.step}/latents_after"
    )
    assert denoiser.count == len(calls)
    # a posterior draw belongs to the first-frame encoder, not to the sampler
    posterior = sum("posterior" in n for n in meta["case_meta"][mode]["noise_order"])
    assert noise.remaining() == ({"posterior": posterior} if posterior else {})
    assert first_given == bool(posterior)
    assert step_err <= tolerance["atol"]
    torch.testing.assert_close(latents, tensors[f"{mode}/final_latents"], **tolerance)


# ---------------------------------------------------------------------- training objective

_DRAW_KINDS = {
    "text_dropout_u": "text_dropout",
    "base_noise_fullres": "noise",
    "timestep_u": "timestep",
    "history_corrupt_sigma_u": "history_sigma",
}
TRAINING = "pyramid_flow/training_loss"


def _training_cases(meta):
    """(case, temporal pyramid on/off) as each case's recorded call says."""
    out = []
    for name, info in meta["cases"].items():
        found = re.search(r"use_temporal_pyramid=(True|False)", info["call"])
        assert found, info["call"]
        out.append(pytest.param(name, found.group(1) == "True", id=name))
    return out


def _training_case(golden_dir, case):
    meta, tensors = _case(golden_dir / TRAINING)
    info = meta["cases"][case]
    draws = {}
    for draw in info["draws"]:
        purpose = draw["purpose"]
        kind = "history_noise" if ".history_noise." in purpose else _DRAW_KINDS[purpose.split(".")[-1]]
        draws.setdefault(kind, []).append(tensors[draw["tensor"]])

    def text(name):
        return TextConditioning(*(tensors[f"{case}/text_table.{name}.{k}"] for k in ("prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds")))

    prompts = TextConditioning.cat([text(p.replace(" ", "_")) for p in info["prompts"]])
    # the full-resolution level of the recorded latent pyramid is the training input
    top = max(int(k.rsplit(".", 1)[1]) for k in tensors if re.fullmatch(re.escape(case) + r"/pyramid\.\d+", k))
    latents = tensors[f"{case}/pyramid.{top}"]
    return meta, tensors, info, draws, prompts, text("null"), latents


def _batch_options(meta, info, temporal):
    ctor = meta["pipeline_constructor"]
    return dict(
        sample_ratios=ctor["sample_ratios"], temporal_pyramid=temporal, units_per_stage=info["num_units_per_stage"],
        corrupt_ratio=ctor["corrupt_ratio"],
    )


@pytest.mark.parametrize("case,temporal", params(TRAINING, _training_cases, 2))
def test_training_loss_construction(golden_dir, case, temporal):
    meta, tensors, info, draws, prompts, null, latents = _training_case(golden_dir, case)
    tolerance = meta["tolerance"]
    noise = RecordedNoise(draws)
    batch = build_flow_batch(latents, prompts, null, noise, **_batch_options(meta, info, temporal))
    # the reference also draws an unused history sigma for columns without history
    assert set(noise.remaining()) <= {"history_sigma"}
    assert [c.stage for c in batch.columns] == [c["stage"] for c in info["columns"]]
    # timesteps are ~1e3 in float32 (ulp 6e-5): never tighter than 1e-4, looser if the case is
    timestep_atol = max(tolerance["construction_atol"], 1e-4)
    for j, (col, expected) in enumerate(zip(batch.columns, info["columns"])):
        assert [list(c.shape) for c in col.clips] == expected["noisy_input_shapes"]
        for k, clip in enumerate(col.clips):
            torch.testing.assert_close(clip, tensors[f"{case}/col{j}.noisy_input.{k}"], rtol=0, atol=tolerance["construction_atol"])
        torch.testing.assert_close(col.target, tensors[f"{case}/col{j}.target"], rtol=0, atol=tolerance["construction_atol"])
        torch.testing.assert_close(col.timesteps, tensors[f"{case}/col{j}.timesteps_list"], rtol=0, atol=timestep_atol)
    # the DiT's text inputs are rows selected from the recorded text table (no arithmetic): exact
    for ours, ref in (("embeds", "encoder_hidden_states"), ("mask", "encoder_attention_mask"), ("pooled", "pooled_projections")):
        torch.testing.assert_close(getattr(batch.text, ours), tensors[f"{case}/dit.{ref}"], rtol=0, atol=0)
    torch.testing.assert_close(batch.timesteps, tensors[f"{case}/dit.timestep_ratio"], rtol=0, atol=timestep_atol)
    # the loss reduction on the recorded predictions
    loss = flow_matching_loss([tensors[f"{case}/col{j}.model_pred"] for j in range(len(batch.columns))], batch)
    assert loss.loss.item() == pytest.approx(info["loss"], rel=tolerance["loss_rtol"])


def _temporal_cases(meta):
    return [name for name, info in meta["cases"].items() if info["num_units_per_stage"] is not None]


@pytest.mark.parametrize("case", params(TRAINING, _temporal_cases))
def test_stage_unit_counts_match_fixture(golden_dir, case):
    meta, _ = _case(golden_dir / TRAINING)
    ctor, info = meta["pipeline_constructor"], meta["cases"][case]
    found = re.search(r"accumulate_steps = (\d+)", ctor["after_construction"])
    assert found, ctor["after_construction"]
    step = int(found.group(1)) + 1  # the reference increments its step counter before use
    max_units = 1 + (ctor["max_temporal_length"] - 1) // ctor["frame_per_unit"]
    counts = stage_unit_counts(step, max_units=max_units, num_frames=info["latents_raw_shape"][2], sync_group=ctor["video_sync_group"])
    assert list(counts) == info["num_units_per_stage"]


# ---------------------------------------------------------------------- end to end with our models


def _pipeline(mmdit_dir, vae_dir):
    from neodragon_cli.pipelines.flow.pipeline import VideoPipeline

    return VideoPipeline(mmdit=neodragon_cli.load_component("mmdit", mmdit_dir), vae=neodragon_cli.load_component("vae", vae_dir))


def _assert_frames_close(frames, expected, tolerance):
    max_diff, max_fraction = tolerance
    diff = frames.astype(int) - expected.numpy().astype(int)
    assert frames.shape == tuple(expected.shape)
    assert abs(diff).max() <= max_diff and (diff != 0).mean() <= max_fraction


def _pf_dirs(golden_dir):
    root = golden_dir / "pyramid_flow"
    meta = _case(root / "generate")[0]
    return (root / "generate" / meta["dit_checkpoint"]).resolve(), (root / "generate" / meta["vae_checkpoint"]).resolve()


def test_pyramid_flow_generate_end_to_end(golden_dir):
    from neodragon_cli.pipelines.flow.pipeline import GenerationSettings

    meta, tensors, _, run, _ = _pyramid_flow_generate(golden_dir)
    pipe = _pipeline(*_pf_dirs(golden_dir))
    kw, config = meta["generate_kwargs"], run["config"]
    settings = GenerationSettings(
        mode="monolithic", first_steps=list(config.first_steps), video_steps=list(config.video_steps),
        guidance=config.guidance, video_guidance=config.video_guidance, frames=meta["decode"]["frames_shape"][0],
        height=kw["height"], width=kw["width"], fps=24,
    ).resolved()
    result = pipe.generate("", settings, noise=run["noise"], text=run["text"], negative=run["negative"])
    assert run["noise"].remaining() == {}
    torch.testing.assert_close(result.latents, tensors["generated_latents"], rtol=0, atol=meta["tolerance"]["latents_atol"])
    # case.json bounds only the largest uint8 difference
    _assert_frames_close(result.frames, tensors["decode.save_memory_true.frames_uint8"], (meta["tolerance"]["frames_uint8_max_abs"], 1.0))


def _nd_dirs(golden_dir):
    """{published folder name: fixture folder} of the Neodragon checkpoints the generate fixture used."""
    folder = golden_dir / GENERATE
    return {name: (folder / path).resolve() for name, path in _case(folder)[0]["checkpoints"].items()}


@pytest.mark.parametrize("mode", params(GENERATE, _modes))
def test_neodragon_generate_end_to_end(golden_dir, mode):
    from neodragon_cli.pipelines.flow.pipeline import GenerationSettings

    meta, tensors, _, run = _neodragon_run(golden_dir, mode)
    dirs = _nd_dirs(golden_dir)
    pipe = _pipeline(dirs["dit"], dirs["vae"])
    info, config = meta[mode], run["config"]
    first_given = run["first_latent"] is not None
    settings = GenerationSettings(
        mode="hybrid" if first_given else "monolithic", first_steps=list(config.first_steps),
        video_steps=list(config.video_steps), guidance=config.guidance, video_guidance=config.video_guidance,
        frames=info["num_frames"], height=info["height"], width=info["width"], fps=24,
    ).resolved()
    image = tensors[f"{mode}/first_frame/image_uint8"].numpy() if first_given else None
    result = pipe.generate("", settings, noise=run["noise"], text=run["text"], negative=run["negative"], image=image)
    assert run["noise"].remaining() == {}
    tolerance = tol(meta["tolerance"]["latents"])
    if first_given:  # latent 0 = the first frame through the VAE encoder and its posterior draw
        torch.testing.assert_close(result.latents[:, :, :1], tensors[f"{mode}/unit0/final"], **tolerance)
    torch.testing.assert_close(result.latents, tensors[f"{mode}/final_latents"], **tolerance)
    assert result.frames.shape[0] == meta["case_meta"][mode]["num_frames_returned"]
    _assert_frames_close(result.frames, tensors[f"{mode}/frames_uint8"], uint8_tolerance(meta["tolerance"]["frames_uint8"]))


@pytest.mark.parametrize("case,temporal", params(TRAINING, _training_cases, 2))
def test_training_loss_with_our_mmdit(golden_dir, case, temporal):
    from neodragon_cli.pipelines.flow.losses import pyramid_flow_loss

    meta, tensors, info, draws, prompts, null, latents = _training_case(golden_dir, case)
    model = neodragon_cli.load_component("mmdit", (golden_dir / TRAINING / meta["dit_checkpoint"]).resolve()).train()
    batch = build_flow_batch(latents, prompts, null, RecordedNoise(draws), **_batch_options(meta, info, temporal))
    loss = pyramid_flow_loss(model, batch)
    for j, prediction in enumerate(loss.predictions):
        torch.testing.assert_close(prediction, tensors[f"{case}/col{j}.model_pred"], rtol=0, atol=meta["tolerance"]["model_pred_atol"])
    assert loss.loss.item() == pytest.approx(info["loss"], rel=meta["tolerance"]["loss_rtol"])
    loss.loss.backward()  # the objective is differentiable end to end
    assert model.proj_out.weight.grad is not None


# ---------------------------------------------------------------------- published layouts


def _link(root, links):
    for name, target in links.items():
        (root / name).symlink_to(target, target_is_directory=True)
    return root


def test_neodragon_layout_loads_and_encodes_prompts_like_the_reference(golden_dir, tmp_path):
    from neodragon_cli.errors import CheckpointError
    from neodragon_cli.pipelines.flow.pipeline import Profiler, VideoPipeline

    dirs = _nd_dirs(golden_dir)
    root = _link(tmp_path, {path.name: path for path in dirs.values()})  # the published folder names
    meta, tensors = _case(golden_dir / GENERATE)
    (mode,) = [m for m in _modes(meta) if "posterior" in " ".join(meta["case_meta"][m]["noise_order"])]  # hybrid
    _, _, _, run = _neodragon_run(golden_dir, mode)
    pipe = VideoPipeline.from_pretrained(root, mode="hybrid")
    assert type(pipe.mmdit) is type(neodragon_cli.load_component("mmdit", dirs["dit"]))
    assert type(pipe.vae) is type(neodragon_cli.load_component("vae", dirs["vae"]))
    assert pipe.defaults.mode == "hybrid" and tuple(pipe.defaults.video_steps) == run["config"].video_steps
    # 49 frames is the published 320p hybrid default (a product setting, not a fixture value)
    assert pipe.defaults.frames == 49
    normalisation = _case(golden_dir / "neodragon" / "vae_decoder")[0]["case_meta"]["normalisation"]
    assert pipe.latent_norm.video_scale == normalisation["VAE_VIDEO_SCALE_FACTOR"]  # Neodragon's own video scale
    text = pipe.encode_prompts([meta[mode]["prompt"] + meta["prompt_modifier"]], Profiler())
    adapter_tol = tol(_case(golden_dir / "neodragon" / "context_adapter")[0]["tolerance"]["output"])
    torch.testing.assert_close(text.mask, tensors[f"{mode}/text/positive/t5_attention_mask"], rtol=0, atol=0)
    torch.testing.assert_close(text.embeds, tensors[f"{mode}/text/encoder_hidden_states"], **adapter_tol)

    with pytest.raises(CheckpointError, match="multistep"):  # monolithic needs its own weights
        VideoPipeline.from_pretrained(root, mode="monolithic")


def test_pyramid_flow_layout_loads_with_its_defaults(golden_dir, tmp_path):
    from neodragon_cli.pipelines.flow.pipeline import VideoPipeline

    mmdit_dir, vae_dir = _pf_dirs(golden_dir)
    t5 = _nd_dirs(golden_dir)
    root = _link(tmp_path, {
        "diffusion_transformer_384p": mmdit_dir,  # the published folder name picks the 384p defaults
        "causal_video_vae": vae_dir,
        "text_encoder_3": t5["text_encoder_3"],
        "tokenizer_3": t5["tokenizer_3"],
    })  # fmt: skip
    pipe = VideoPipeline.from_pretrained(root)
    assert type(pipe.mmdit) is type(neodragon_cli.load_component("mmdit", mmdit_dir))
    assert type(pipe.vae) is type(neodragon_cli.load_component("vae", vae_dir))
    # the published 384p defaults (product settings, not fixture values)
    assert (pipe.defaults.height, pipe.defaults.width, pipe.defaults.frames) == (384, 640, 121)
    scheduler_meta = _case(golden_dir / "pyramid_flow" / "scheduler")[0]
    recorded = scheduler_meta["latent_normalisation"]["pyramid_mmdit"]["video_scale"]
    assert pipe.latent_norm.video_scale == pytest.approx(recorded, abs=_scheduler_tolerances(scheduler_meta)[0])
