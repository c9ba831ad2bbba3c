"""The Shapes-teacher recipes end to end at toy size: train-vae -> train-t2v -> generate -> eval."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from neodragon_cli.app import app
from neodragon_cli.artifacts import read_state

pytestmark = pytest.mark.recipe
runner = CliRunner()

WORLD = ["world.height=64", "world.width=64", "world.frames=9"]
TRAIN = ["train.max_steps=2", "train.warmup_steps=0", "train.checkpoint_every=0", "train.log_every=1"]


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def test_teacher_recipes_train_generate_eval(tmp_path):
    vae_out, t2v_out = tmp_path / "vae", tmp_path / "t2v"
    _ok(runner.invoke(app, [
        "train", "shapes/teacher_vae", "-o", str(vae_out), *WORLD, *TRAIN, "train.batch_size=2",
        "data.clip_frames=9", "data.crop=32", "data.norm_videos=2",
        "model.block_out_channels=[8,8,8,8]", "model.norm_num_groups=4",
    ]))
    norm = json.loads((vae_out / "latent_norm.json").read_text())
    assert set(norm) == {"image_shift", "image_scale", "video_shift", "video_scale"}
    assert read_state(vae_out)["operations"][0]["operation"] == "train-vae"
    assert len((vae_out / "metrics.jsonl").read_text().splitlines()) == 2

    # stage 1b: fine-tune on whole clips from the stage-1 weights; reconstructions are judged
    long_out = tmp_path / "vae-long"
    _ok(runner.invoke(app, [
        "train", "shapes/teacher_vae_long", "-o", str(long_out), *WORLD, *TRAIN, "train.batch_size=1",
        "data.crop=32", "data.clip_frames=9", "data.norm_videos=2", "data.judge_videos=2", "data.readout_videos=24",
        "model.block_out_channels=[8,8,8,8]", "model.norm_num_groups=4", f"model.init={vae_out}", "loss.linear_colour=1",
    ]))
    operation = read_state(long_out)["operations"][-1]
    assert operation["parent"]["path"] == str(vae_out)
    reconstruction = operation["results"]["reconstruction"]
    assert {"semantic", "quality", "psnr", "count", "colour", "shape"} <= set(reconstruction)
    assert 0.0 <= reconstruction["semantic"] <= 1.0
    first = reconstruction["first_frame"]
    assert {"semantic", "psnr", "colour", "shape"} <= set(first) and "motion" not in first
    readout = operation["results"]["latent_colour_readout"]
    assert set(readout) == {"level0", "level1", "level2"} and all(0.0 <= v <= 1.0 for v in readout.values())
    assert "linear_colour" in json.loads((long_out / "metrics.jsonl").read_text().splitlines()[0])

    # decoder-only fine-tuning: the encoder, so the latents and their normalisation, stay as they were
    dec_out = tmp_path / "vae-dec"
    _ok(runner.invoke(app, [
        "train", "shapes/teacher_vae_long", "-o", str(dec_out), *WORLD, *TRAIN, "train.batch_size=1", "train.lr=1e-2",
        "data.crop=32", "data.clip_frames=9", "data.judge_videos=0",
        "model.block_out_channels=[8,8,8,8]", "model.norm_num_groups=4", f"model.init={long_out}", "model.train_encoder=false",
        "loss.adversarial=0.5", "loss.adversarial_start=1", "loss.critic_frames=2", "loss.latent_noise=0.5",
    ]))
    logged = [json.loads(line) for line in (dec_out / "metrics.jsonl").read_text().splitlines()]
    assert logged[0]["adversarial_weight"] == 0 and logged[1]["adversarial_weight"] > 0  # after the critic's warm-up
    before, after = (load_file(str(d / "vae" / "diffusion_pytorch_model.safetensors")) for d in (long_out, dec_out))
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert set(after) == set(before)  # the critic is not part of the VAE
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert (dec_out / "latent_norm.json").read_text() == (long_out / "latent_norm.json").read_text()

    t2v_args = [
        "train", "shapes/teacher_t2v", "-o", str(t2v_out), *WORLD, *TRAIN, "train.batch_size=4",
        f"data.vae={vae_out}", "data.videos=4", "data.images=8", "data.image_share=0.5",
        "text.t5_width=32", "text.clip_width=32", "text.pooled_dim=16",
        "mmdit.num_layers=1", "mmdit.num_attention_heads=2", "mmdit.attention_head_dim=16", "mmdit.prediction=clean",
    ]
    _ok(runner.invoke(app, [*t2v_args, "data.whiten=true"]))
    unwhitened = runner.invoke(app, [*t2v_args, "train.max_steps=3", "--resume", "--overwrite"])
    assert unwhitened.exit_code == 2 and "trained on whitened latents" in unwhitened.output
    as_velocity = runner.invoke(app, [*t2v_args, "data.whiten=true", "mmdit.prediction=velocity", "train.max_steps=3", "--resume", "--overwrite"])
    assert as_velocity.exit_code == 2 and "an MMDiT that predicts clean" in as_velocity.output
    first = json.loads((t2v_out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss_stage0", "loss_stage1", "loss_stage2"} <= set(first)
    state = read_state(t2v_out)
    assert [o["operation"] for o in state["operations"]] == ["train-vae", "train-t2v"]
    results = state["operations"][-1]["results"]
    assert results["images"] == 8 and results["image_share"] == 0.5
    assert tuple(load_file(str(tmp_path / "t2v.work" / "images.safetensors"))["latents"].shape) == (8, 16, 1, 8, 8)
    assert state["operations"][-1]["parent"]["path"] == str(vae_out)
    # the MMDiT trained on whitened latents: the pipeline un-whitens with the same measured map
    shipped_norm = json.loads((t2v_out / "pipeline.json").read_text())["latent_norm"]
    measured = json.loads((tmp_path / "t2v.work" / "whitening.json").read_text())
    assert shipped_norm == {**norm, **measured} and len(measured["video_whitening"]["basis"]) == 16
    # a clean-latent MMDiT says so in its config, and generate reads it from there
    assert json.loads((t2v_out / "mmdit" / "config.json").read_text())["prediction"] == "clean"

    video = tmp_path / "gen" / "clip.mp4"
    _ok(runner.invoke(app, [
        "generate", "a red circle moving left", "--model", str(t2v_out), "-o", str(video),
        "--steps", "1-1-1", "--first-steps", "1-1-1", "--seed", "3",
    ]))
    from neodragon_cli.pipelines.data.video_io import read_video

    frames, fps = read_video(video)
    assert frames.shape == (9, 64, 64, 3) and fps == 24
    report = tmp_path / "eval.json"
    _ok(runner.invoke(app, ["eval", str(video.parent), "--json", str(report)]))
    assert json.loads(report.read_text())


def test_vae_init_must_match_the_recipe(tmp_path):
    result = runner.invoke(app, ["train", "shapes/teacher_vae_long", "-o", str(tmp_path / "x"), f"model.init={tmp_path}"])
    assert result.exit_code == 2 and "neither a train-vae artifact nor a VAE folder" in result.output


def test_frozen_encoder_needs_a_trained_one(tmp_path):
    result = runner.invoke(app, ["train", "shapes/teacher_vae", "-o", str(tmp_path / "x"), "model.train_encoder=false"])
    assert result.exit_code == 2 and "model.train_encoder=false needs model.init" in result.output


def test_t2v_requires_vae_artifact(tmp_path):
    result = runner.invoke(app, ["train", "shapes/teacher_t2v", "-o", str(tmp_path / "x"), "data.vae=" + str(tmp_path)])
    assert result.exit_code == 2 and "not a train-vae artifact" in result.output
    result = runner.invoke(app, ["train", "shapes/teacher_t2v", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "data.vae is not set" in result.output


def test_a_stopped_run_says_it_can_be_resumed(tmp_path, monkeypatch):
    from neodragon_cli.pipelines.train import train_vae
    from neodragon_cli.pipelines.train.trainer import Trainer

    class StopsAfterOneStep(Trainer):  # as Ctrl-C after the first update does
        def fit(self, on_step_end=None):
            return super().fit(lambda trainer, step: trainer.request_stop())

    out = tmp_path / "vae"
    args = ["train", "shapes/teacher_vae", "-o", str(out), *WORLD, *TRAIN, "train.batch_size=1", "data.crop=32",
            "data.clip_frames=9", "data.norm_videos=1", "data.judge_videos=0",
            "model.block_out_channels=[8,8,8,8]", "model.norm_num_groups=4"]
    with monkeypatch.context() as patch:
        patch.setattr(train_vae, "Trainer", StopsAfterOneStep)
        stopped = _ok(runner.invoke(app, args))
    assert f"stopped at step 1; continue with --resume (checkpoints in {tmp_path / 'vae.work'})" in " ".join(stopped.output.split())
    assert not out.exists()
    _ok(runner.invoke(app, [*args, "--resume"]))
    assert read_state(out)["operations"][0]["results"]["steps"] == 2
