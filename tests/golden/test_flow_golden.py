"""Pyramidal flow engine against the reference fixtures: scheduler tables (exact), block-noise
layout, the generation loops replayed from recorded noise (with the recorded DiT outputs, and end to
end with our models when their checkpoints load), and the training-loss construction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from neodragon_cli.pipelines.flow.losses import build_flow_batch, flow_matching_loss, stage_unit_counts
from neodragon_cli.pipelines.flow.sampler import PyramidSampler, RecordedNoise, SamplingConfig, TextConditioning
from neodragon_cli.pipelines.flow.scheduler import PyramidFlowScheduler, arrange_blocks, block_noise_cholesky

pytestmark = pytest.mark.golden


def _case(folder):
    return json.loads((folder / "case.json").read_text()), load_file(str(folder / "case.safetensors"))


# ---------------------------------------------------------------------- scheduler


def test_scheduler_tables_exact(golden_dir):
    meta, tensors = _case(golden_dir / "pyramid_flow" / "scheduler")
    sched = PyramidFlowScheduler(**{k: meta["constructor"][k] for k in ("num_train_timesteps", "stages", "stage_range", "gamma")})
    np.testing.assert_array_equal(sched.global_timesteps, tensors["global.timesteps"].numpy())
    np.testing.assert_array_equal(sched.global_sigmas, tensors["global.sigmas"].numpy())
    for i, expected in enumerate(meta["stages"]):
        stage = sched.stages[i]
        assert stage.start_sigma == pytest.approx(expected["start_sigma"], abs=1e-9)
        assert stage.end_sigma == pytest.approx(expected["end_sigma"], abs=1e-9)
        assert stage.ori_start_sigma == pytest.approx(expected["ori_start_sigma"], abs=1e-9)
        np.testing.assert_allclose(stage.timestep_ratio, expected["timestep_ratio"], rtol=0, atol=1e-9)
        np.testing.assert_allclose(stage.timesteps, tensors[f"stage{i}.timesteps_per_stage"].numpy(), rtol=0, atol=1e-9)
        np.testing.assert_allclose(stage.sigmas, tensors[f"stage{i}.sigmas_per_stage"].numpy(), rtol=0, atol=1e-9)
        for n, steps in expected["set_timesteps"].items():
            ts, sig = sched.timesteps(int(n), i), sched.sigmas(int(n), i)
            np.testing.assert_allclose(ts, tensors[f"stage{i}.set_timesteps_{n}.timesteps"].numpy(), rtol=0, atol=1e-9)
            np.testing.assert_allclose(sig, tensors[f"stage{i}.set_timesteps_{n}.sigmas"].numpy(), rtol=0, atol=1e-9)
            np.testing.assert_array_equal(ts.astype(np.float32), np.float32(steps["timesteps_as_fed_to_dit_float32"]))
            np.testing.assert_allclose(np.diff(sig), steps["euler_dt"], rtol=0, atol=1e-12)


def test_stage_jump_and_block_noise_covariance(golden_dir):
    meta, _ = _case(golden_dir / "pyramid_flow" / "generate")
    sched = PyramidFlowScheduler()
    for jump in meta["stage_jumps"]:
        alpha, beta = sched.jump_coefficients(jump["stage"])
        assert alpha == pytest.approx(jump["alpha"], abs=1e-12) and beta == pytest.approx(jump["beta"], abs=1e-12)
    np.testing.assert_allclose(block_noise_cholesky().numpy(), meta["block_noise"]["scale_tril_used"], atol=1e-7)


def test_block_noise_layout(golden_dir):
    meta, tensors = _case(golden_dir / "pyramid_flow" / "generate")
    block_draws = [n["name"] for n in meta["noise"] if "block_noise" in n["name"]]
    for i, name in enumerate(block_draws):
        raw = tensors[f"debug.block_noise_raw.{i:03d}"]  # [blocks, 4] in (b, c, t, h/2, w/2) order
        b, c, t, h, w = tensors[name].shape
        torch.testing.assert_close(arrange_blocks(raw.reshape(b, c, t, h // 2, w // 2, 4)), tensors[name], rtol=0, atol=0)


# ---------------------------------------------------------------------- generation loops


class _RecordedDenoiser:
    """Stands in for the DiT: checks the inputs the sampler gives it against the recorded ones and
    returns the recorded output of that call (so the sampler's own arithmetic is what is tested)."""

    def __init__(self, calls):
        self.calls = iter(calls)  # (history clips, current input, timestep, output)
        self.count = 0

    def __call__(self, clips, text, timestep):
        history, current, t, output = next(self.calls)
        assert len(clips) == len(history) + 1
        for got, want in zip(clips, history):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        torch.testing.assert_close(clips[-1], current, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(timestep.numpy(), t, rtol=0, atol=1e-6)
        self.count += 1
        return output


def _pyramid_flow_generate(golden_dir):
    meta, tensors = _case(golden_dir / "pyramid_flow" / "generate")

    def text(which):
        return TextConditioning(*(tensors[f"text.{which}.{k}"] for k in ("prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds")))

    kw = meta["generate_kwargs"]
    noise = RecordedNoise(
        {
            "initial": [tensors["noise.000.initial_latents_randn"]],
            "block": [tensors[n["name"]] for n in meta["noise"] if "block_noise" in n["name"]],
        }
    )
    config = SamplingConfig(
        first_steps=tuple(kw["num_inference_steps"]), video_steps=tuple(kw["video_num_inference_steps"]),
        guidance=kw["guidance_scale"], video_guidance=kw["video_guidance_scale"],
    )
    calls = []
    for call in meta["dit_calls"]:
        prefix = f"unit{call['unit']}.stage{call['stage']}"
        history = [tensors[f"{prefix}.history.{j}"] for j in range(len(call["sample_shapes"][0]) - 1)]
        step = f"{prefix}.step{call['step']}"
        calls.append((history, tensors[f"{step}.dit_input_current"], call["timestep_ratio"], tensors[f"{step}.dit_output"]))
    run = dict(
        text=text("positive"), negative=text("negative"), num_frames=kw["temp"], latent_channels=16,
        latent_size=(kw["height"] // 8, kw["width"] // 8), config=config, noise=noise,
    )
    return meta, tensors, calls, run


def _collect(sampler, run, tensors, key):
    errors = []

    def check(event):
        errors.append((event.latents_out - tensors[key(event)]).abs().max().item())

    latents = torch.cat(list(sampler.latent_frames(run.pop("text"), callback=check, **run)), dim=2)
    return latents, max(errors)


def test_pyramid_flow_generate_loop_with_recorded_dit_outputs(golden_dir):
    meta, tensors, calls, run = _pyramid_flow_generate(golden_dir)
    denoiser = _RecordedDenoiser(calls)
    noise = run["noise"]
    latents, step_err = _collect(
        PyramidSampler(denoiser), run, tensors, lambda e: f"unit{e.unit}.stage{e.stage}.step{e.step}.latents_after"
    )
    assert denoiser.count == len(calls) and noise.remaining() == {}
    assert step_err <= meta["tolerance"]["per_step_atol"]
    torch.testing.assert_close(latents, tensors["generated_latents"], rtol=0, atol=meta["tolerance"]["latents_atol"])


def _neodragon_run(golden_dir, mode):
    meta, tensors = _case(golden_dir / "neodragon" / "hybrid_generate")
    p = f"{mode}/"
    info = meta[mode]
    draws = {"initial": [], "block": [], "posterior": []}
    for name in meta["case_meta"][mode]["noise_order"]:
        kind = "initial" if "initial" in name else "posterior" if "posterior" in name else "block"
        draws[kind].append(tensors[f"{p}noise/{name}"])
    t5_mask = tensors[f"{p}text/positive/t5_attention_mask"]
    pooled = lambda which: torch.cat([tensors[f"{p}text/{which}/clip_l_pooled"], tensors[f"{p}text/{which}/clip_g_pooled"]], -1)  # noqa: E731
    embeds = tensors[f"{p}text/encoder_hidden_states"]
    if mode == "hybrid":
        config = SamplingConfig(first_steps=(1, 1, 1), video_steps=(1, 1, 1), guidance=0.0, video_guidance=0.0)
        text, negative = TextConditioning(embeds, t5_mask, pooled("positive")), None
        first, units = tensors[f"{p}unit0/final"], range(1, (info["num_frames"] - 1) // 8 + 1)
    else:
        config = SamplingConfig(
            first_steps=tuple(info["num_inference_steps"]), video_steps=tuple(info["video_num_inference_steps"]),
            guidance=7.0, video_guidance=5.0,
        )
        text = TextConditioning(embeds[1:], t5_mask, pooled("positive"))
        negative = TextConditioning(embeds[:1], tensors[f"{p}text/negative/t5_attention_mask"], pooled("negative"))
        first, units = None, range(0, (info["num_frames"] - 1) // 8 + 1)
    calls = []
    for u in units:
        for s in range(3):
            stage = f"{p}unit{u}/stage{s}/"
            history = [tensors[k] for k in sorted(k for k in tensors if k.startswith(stage + "history"))]
            for j in range(config.first_steps[s] if u == 0 else config.video_steps[s]):
                step = f"{stage}step{j}/"
                calls.append((history, tensors[step + "dit_input"], tensors[step + "timestep"].numpy(), tensors[step + "dit_output"]))
    run = dict(
        text=text, negative=negative, first_latent=first, num_frames=(info["num_frames"] - 1) // 8 + 1,
        latent_channels=16, latent_size=(info["height"] // 8, info["width"] // 8), config=config,
        noise=RecordedNoise(draws),
    )
    return meta, tensors, calls, run


@pytest.mark.parametrize("mode", ["hybrid", "monolithic"])
def test_neodragon_generate_loop_with_recorded_dit_outputs(golden_dir, mode):
    meta, tensors, calls, run = _neodragon_run(golden_dir, mode)
    denoiser = _RecordedDenoiser(calls)
    noise = run["noise"]
    latents, step_err = _collect(
        PyramidSampler(denoiser), run, tensors, lambda e: f"{mode}/unit{e.unit}/stage{e.stage}/step{e.step}/latents_after"
    )
    assert denoiser.count == len(calls)
    # the posterior draw belongs to the first-frame encoder, not to the sampler
    assert noise.remaining() == ({"posterior": 1} if mode == "hybrid" else {})
    tol = meta["tolerance"]["latents"]
    assert step_err <= tol["atol"]
    torch.testing.assert_close(latents, tensors[f"{mode}/final_latents"], **tol)


# ---------------------------------------------------------------------- training objective

_DRAW_KINDS = {
    "text_dropout_u": "text_dropout",
    "base_noise_fullres": "noise",
    "timestep_u": "timestep",
    "history_corrupt_sigma_u": "history_sigma",
}


def _training_case(golden_dir, case):
    meta, tensors = _case(golden_dir / "pyramid_flow" / "training_loss")
    info = meta["cases"][case]
    draws = {}
    for draw in info["draws"]:
        purpose = draw["purpose"]
        kind = "history_noise" if ".history_noise." in purpose else _DRAW_KINDS[purpose.split(".")[-1]]
        draws.setdefault(kind, []).append(tensors[draw["tensor"]])

    def text(name):
        return TextConditioning(*(tensors[f"{case}/text_table.{name}.{k}"] for k in ("prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds")))

    prompts = TextConditioning.cat([text(p.replace(" ", "_")) for p in info["prompts"]])
    return meta, tensors, info, draws, prompts, text("null")


@pytest.mark.parametrize("case,temporal", [("video_temporal_pyramid", True), ("image_no_temporal_pyramid", False)])
def test_training_loss_construction(golden_dir, case, temporal):
    meta, tensors, info, draws, prompts, null = _training_case(golden_dir, case)
    tol = meta["tolerance"]
    noise = RecordedNoise(draws)
    batch = build_flow_batch(
        tensors[f"{case}/pyramid.2"], prompts, null, noise,
        sample_ratios=meta["pipeline_constructor"]["sample_ratios"], temporal_pyramid=temporal,
        units_per_stage=info["num_units_per_stage"], corrupt_ratio=meta["pipeline_constructor"]["corrupt_ratio"],
    )
    # the reference also draws an unused history sigma for columns without history
    assert set(noise.remaining()) <= {"history_sigma"}
    assert [c.stage for c in batch.columns] == [c["stage"] for c in info["columns"]]
    for j, (col, expected) in enumerate(zip(batch.columns, info["columns"])):
        assert [list(c.shape) for c in col.clips] == expected["noisy_input_shapes"]
        for k, clip in enumerate(col.clips):
            torch.testing.assert_close(clip, tensors[f"{case}/col{j}.noisy_input.{k}"], rtol=0, atol=tol["construction_atol"])
        torch.testing.assert_close(col.target, tensors[f"{case}/col{j}.target"], rtol=0, atol=tol["construction_atol"])
        torch.testing.assert_close(col.timesteps, tensors[f"{case}/col{j}.timesteps_list"], rtol=0, atol=1e-4)
    for ours, ref in (("embeds", "encoder_hidden_states"), ("mask", "encoder_attention_mask"), ("pooled", "pooled_projections")):
        torch.testing.assert_close(getattr(batch.text, ours), tensors[f"{case}/dit.{ref}"], rtol=0, atol=0)
    torch.testing.assert_close(batch.timesteps, tensors[f"{case}/dit.timestep_ratio"], rtol=0, atol=1e-4)
    # the loss reduction on the recorded predictions
    loss = flow_matching_loss([tensors[f"{case}/col{j}.model_pred"] for j in range(len(batch.columns))], batch)
    assert loss.loss.item() == pytest.approx(info["loss"], rel=tol["loss_rtol"])


def test_stage_unit_counts_match_fixture(golden_dir):
    meta, _ = _case(golden_dir / "pyramid_flow" / "training_loss")
    ctor, info = meta["pipeline_constructor"], meta["cases"]["video_temporal_pyramid"]
    max_units = 1 + (ctor["max_temporal_length"] - 1) // ctor["frame_per_unit"]
    counts = stage_unit_counts(1, max_units=max_units, num_frames=info["latents_raw_shape"][2], sync_group=ctor["video_sync_group"])
    assert list(counts) == info["num_units_per_stage"]


# ---------------------------------------------------------------------- end to end with our models


def _pipeline(mmdit_cls, mmdit_dir, vae_cls, vae_dir):
    from neodragon_cli.pipelines.flow.pipeline import VideoPipeline

    return VideoPipeline(mmdit=mmdit_cls.from_pretrained(mmdit_dir).eval(), vae=vae_cls.from_pretrained(vae_dir).eval())


def _assert_frames_close(frames, expected, max_fraction=1e-3):
    diff = (frames.astype(int) - expected.numpy().astype(int))
    assert frames.shape == tuple(expected.shape)
    assert abs(diff).max() <= 1 and (diff != 0).mean() <= max_fraction


def test_pyramid_flow_generate_end_to_end(golden_dir):
    from neodragon_cli.pipelines.flow.pipeline import GenerationSettings
    from neodragon_cli.pipelines.models.causal_vae import CausalVideoVAE
    from neodragon_cli.pipelines.models.mmdit import PyramidFlowMMDiT

    meta, tensors, _, run = _pyramid_flow_generate(golden_dir)
    root = golden_dir / "pyramid_flow"
    pipe = _pipeline(PyramidFlowMMDiT, root / "mmdit" / "checkpoint", CausalVideoVAE, root / "vae" / "checkpoint")
    kw, config = meta["generate_kwargs"], run["config"]
    settings = GenerationSettings(
        mode="monolithic", first_steps=list(config.first_steps), video_steps=list(config.video_steps),
        guidance=config.guidance, video_guidance=config.video_guidance, frames=8 * (kw["temp"] - 1) + 1,
        height=kw["height"], width=kw["width"], fps=24,
    ).resolved()
    result = pipe.generate("", settings, noise=run["noise"], text=run["text"], negative=run["negative"])
    assert run["noise"].remaining() == {}
    torch.testing.assert_close(result.latents, tensors["generated_latents"], rtol=0, atol=meta["tolerance"]["latents_atol"])
    _assert_frames_close(result.frames, tensors["decode.save_memory_true.frames_uint8"])


@pytest.mark.parametrize("mode", ["hybrid", "monolithic"])
def test_neodragon_generate_end_to_end(golden_dir, mode):
    from neodragon_cli.pipelines.flow.pipeline import GenerationSettings
    from neodragon_cli.pipelines.models.causal_vae import AsymmetricCausalVideoVAE
    from neodragon_cli.pipelines.models.mmdit import NeodragonMMDiT

    meta, tensors, _, run = _neodragon_run(golden_dir, mode)
    root = golden_dir / "neodragon"
    pipe = _pipeline(NeodragonMMDiT, root / "mmdit" / "diffusion_transformer_320p", AsymmetricCausalVideoVAE, root / "vae_decoder" / "causal_video_vae")
    info, config = meta[mode], run["config"]
    settings = GenerationSettings(
        mode=mode, first_steps=list(config.first_steps), video_steps=list(config.video_steps),
        guidance=config.guidance, video_guidance=config.video_guidance, frames=info["num_frames"],
        height=info["height"], width=info["width"], fps=24,
    ).resolved()
    image = tensors["hybrid/first_frame/image_uint8"].numpy() if mode == "hybrid" else None
    result = pipe.generate("", settings, noise=run["noise"], text=run["text"], negative=run["negative"], image=image)
    assert run["noise"].remaining() == {}
    tol = meta["tolerance"]["latents"]
    if mode == "hybrid":  # latent 0 = the first frame through the VAE encoder and its posterior draw
        torch.testing.assert_close(result.latents[:, :, :1], tensors["hybrid/unit0/final"], **tol)
    torch.testing.assert_close(result.latents, tensors[f"{mode}/final_latents"], **tol)
    _assert_frames_close(result.frames, tensors[f"{mode}/frames_uint8"])


@pytest.mark.parametrize("case,temporal", [("video_temporal_pyramid", True), ("image_no_temporal_pyramid", False)])
def test_training_loss_with_our_mmdit(golden_dir, case, temporal):
    from neodragon_cli.pipelines.flow.losses import pyramid_flow_loss
    from neodragon_cli.pipelines.models.mmdit import PyramidFlowMMDiT

    meta, tensors, info, draws, prompts, null = _training_case(golden_dir, case)
    model = PyramidFlowMMDiT.from_pretrained(golden_dir / "pyramid_flow" / "mmdit" / "checkpoint").train()
    batch = build_flow_batch(
        tensors[f"{case}/pyramid.2"], prompts, null, RecordedNoise(draws), temporal_pyramid=temporal,
        units_per_stage=info["num_units_per_stage"],
    )
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
    from neodragon_cli.pipelines.flow.pipeline import Profiler, VideoPipeline
    from neodragon_cli.pipelines.models.causal_vae import AsymmetricCausalVideoVAE
    from neodragon_cli.pipelines.models.mmdit import NeodragonMMDiT

    nd = golden_dir / "neodragon"
    root = _link(tmp_path, {
        "diffusion_transformer_320p": nd / "mmdit" / "diffusion_transformer_320p",
        "context_adapter": nd / "context_adapter" / "context_adapter",
        "causal_video_vae": nd / "vae_decoder" / "causal_video_vae",
        "text_encoder_3": nd / "distil_t5" / "text_encoder_3",
        "tokenizer_3": nd / "distil_t5" / "tokenizer_3",
    })  # fmt: skip
    pipe = VideoPipeline.from_pretrained(root, mode="hybrid")
    assert isinstance(pipe.mmdit, NeodragonMMDiT) and isinstance(pipe.vae, AsymmetricCausalVideoVAE)
    assert pipe.defaults.mode == "hybrid" and pipe.defaults.video_steps == [1, 1, 1] and pipe.defaults.frames == 49
    assert pipe.latent_norm.video_scale == 0.3031  # Neodragon's own video scale
    meta, tensors = _case(nd / "hybrid_generate")
    text = pipe.encode_prompts([meta["hybrid"]["prompt"] + meta["prompt_modifier"]], Profiler())
    torch.testing.assert_close(text.mask, tensors["hybrid/text/positive/t5_attention_mask"], rtol=0, atol=0)
    torch.testing.assert_close(text.embeds, tensors["hybrid/text/encoder_hidden_states"], rtol=1e-4, atol=1e-5)
    from neodragon_cli.errors import CheckpointError

    with pytest.raises(CheckpointError, match="multistep"):  # monolithic needs its own weights
        VideoPipeline.from_pretrained(root, mode="monolithic")


def test_pyramid_flow_layout_loads_with_its_defaults(golden_dir, tmp_path):
    from neodragon_cli.pipelines.flow.pipeline import VideoPipeline
    from neodragon_cli.pipelines.models.causal_vae import CausalVideoVAE
    from neodragon_cli.pipelines.models.mmdit import PyramidFlowMMDiT

    root = _link(tmp_path, {
        "diffusion_transformer_384p": golden_dir / "pyramid_flow" / "mmdit" / "checkpoint",
        "causal_video_vae": golden_dir / "pyramid_flow" / "vae" / "checkpoint",
        "text_encoder_3": golden_dir / "neodragon" / "distil_t5" / "text_encoder_3",
        "tokenizer_3": golden_dir / "neodragon" / "distil_t5" / "tokenizer_3",
    })  # fmt: skip
    pipe = VideoPipeline.from_pretrained(root)
    assert isinstance(pipe.mmdit, PyramidFlowMMDiT) and isinstance(pipe.vae, CausalVideoVAE)
    assert (pipe.defaults.height, pipe.defaults.width, pipe.defaults.frames) == (384, 640, 121)
    assert pipe.latent_norm.video_scale == pytest.approx(1 / 3.0986)
