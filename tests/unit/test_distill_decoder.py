"""`distill-decoder` on the embedded Shapes teacher's causal VAE (widths 16-64) with tiny students:
a few steps lower the loss while the encoder stays bit-identical; the taehv-8x artifact loads as
`vae/neodragon-asymmetric` in the golden Neodragon layout and the pipeline decodes with it; resume is
bit-exact; causal-narrow narrows the parent's decoder; a published TAEHV decoder seeds taehv-8x with
its re-strided TGrow fresh; real video folders (.jsonl / .csv) give clips; user mistakes exit 2 with
nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from neodragon_cli import load_component
from neodragon_cli.app import app
from neodragon_cli.artifacts import embedded_models_root, read_state, verify_artifact
from neodragon_cli.pipelines.data.video_folders import VideoFolderClips
from neodragon_cli.pipelines.data.video_io import write_video
from neodragon_cli.pipelines.distill.distill_decoder import DecoderSection, build_student
from neodragon_cli.pipelines.flow.pipeline import VideoPipeline
from neodragon_cli.pipelines.models.causal_vae import AsymmetricCausalVideoVAE, CausalVideoVAE
from neodragon_cli.pipelines.models.taehv import TAEHV

runner = CliRunner()
TEACHER = embedded_models_root() / "shapes-teacher"
GOLDEN_WIDTHS = "[32,24,16,16]"  # the golden fixture's decoder widths
# A 64 x 64, 9-frame world renders fast; 4 cached clips, batches of 2.
TINY = ["world.height=64", "world.width=64", "world.frames=9", "data.patch=[9,64,64]", "data.clips=4",
        "data.judge_videos=0", "train.batch_size=2", "train.lr=3e-4", "train.log_every=1", "train.checkpoint_every=0",
        "train.precision=fp32", f"decoder.num_features={GOLDEN_WIDTHS}"]


def distill(out: Path, *extra: str, resume: bool = False):
    args = ["distill-decoder", "shapes/distill_decoder", *TINY, *extra, "-o", str(out)]
    return runner.invoke(app, args + (["--resume", "--overwrite"] if resume else []))


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def losses(out: Path) -> list[float]:
    return [line["loss"] for line in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in line]


@pytest.fixture(scope="module")
def taehv_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("taehv") / "out"
    result = distill(out, "train.max_steps=8", "data.clips=2", "train.lr=5e-4")  # one batch, seen 8 times
    assert result.exit_code == 0, result.output
    return out


def test_taehv_8x_lowers_the_loss_and_keeps_the_encoder_bit_identical(taehv_run):
    curve = losses(taehv_run)
    assert len(curve) == 8 and curve[-1] < 0.7 * curve[0], curve
    ours, parent = (tensors(p / "vae" / "diffusion_pytorch_model.safetensors") for p in (taehv_run, TEACHER))
    frozen = [k for k in parent if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(ours[k], parent[k]) for k in frozen)
    assert verify_artifact(taehv_run) == []
    operation = read_state(taehv_run)["operations"][-1]
    assert operation["operation"] == "distill-decoder"
    assert operation["results"]["perceptual_loss"].startswith("edge")
    assert operation["results"]["params_decoder"] < operation["results"]["params_parent_decoder"]


def test_taehv_8x_output_is_the_golden_neodragon_asymmetric_layout(taehv_run, golden_dir):
    vae = load_component("vae", taehv_run / "vae")
    assert isinstance(vae, AsymmetricCausalVideoVAE)
    golden = golden_dir / "neodragon" / "vae_decoder" / "causal_video_vae"
    ours_config, golden_config = (json.loads((p / "config.json").read_text()) for p in (taehv_run / "vae", golden))
    fields = ({k for k in c if not k.startswith("_")} for c in (ours_config, golden_config))  # _diffusers_version is metadata
    assert next(fields) == next(fields) and ours_config["_class_name"] == golden_config["_class_name"]
    decoder_side = ("decoder.", "post_quant_conv.")
    ours, reference = (
        {k: tuple(v.shape) for k, v in tensors(p / "diffusion_pytorch_model.safetensors").items() if k.startswith(decoder_side)}
        for p in (taehv_run / "vae", golden))
    assert ours == reference


def test_the_pipeline_decodes_with_the_new_decoder_streaming(taehv_run):
    pipe = VideoPipeline.from_pretrained(taehv_run, safety_checker=False)
    assert isinstance(pipe.vae, AsymmetricCausalVideoVAE) and pipe.decoder is None
    parent_norm = json.loads((TEACHER / "pipeline.json").read_text())["latent_norm"]
    assert json.loads((taehv_run / "pipeline.json").read_text())["latent_norm"] == parent_norm
    latents = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = pipe.vae.decode(latents)
        streamed = torch.cat(list(pipe.vae.stream_decode(latents.split(1, dim=2))), dim=2)
    assert whole.shape == (1, 3, 17, 32, 32)
    torch.testing.assert_close(streamed, whole, atol=1e-5, rtol=1e-5)


def test_resume_is_bit_exact(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert distill(straight, "train.max_steps=4").exit_code == 0
    assert distill(split, "train.max_steps=2").exit_code == 0
    result = distill(split, "train.max_steps=4", resume=True)
    assert result.exit_code == 0, result.output
    a, b = (tensors(p / "vae" / "diffusion_pytorch_model.safetensors") for p in (straight, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_causal_narrow_halves_the_parents_decoder(tmp_path):
    out = tmp_path / "narrow"
    result = distill(out, "decoder.family=causal-narrow", "train.max_steps=3")
    assert result.exit_code == 0, result.output
    vae = load_component("vae", out / "vae")
    assert isinstance(vae, CausalVideoVAE) and vae.config["decoder_block_out_channels"] == [8, 16, 32, 32]
    assert json.loads((out / "pipeline.json").read_text())["components"]["vae"]["component"] == "vae/pyramid-flow"
    assert verify_artifact(out) == []


def test_a_published_taehv_decoder_seeds_taehv_8x_with_the_restrided_tgrow_fresh(tmp_path):
    torch.manual_seed(0)
    published = TAEHV()
    published.save_pretrained(tmp_path / "taehv")
    parent = CausalVideoVAE.from_pretrained(TEACHER / "vae")
    student, fresh = build_student(DecoderSection(init=str(tmp_path / "taehv")), parent)
    assert fresh == ["decoder.blocks.7.conv.weight"]
    assert torch.equal(student.decoder.blocks[1].weight, published.decoder[1].weight)
    assert torch.equal(student.decoder.blocks[22].weight, published.decoder[22].weight)
    assert student.decoder.blocks[7].conv.weight.shape == (512, 256, 1, 1)
    assert not any(p.requires_grad for p in student.encoder.parameters())


def _write_videos(root: Path) -> None:
    rng = np.random.default_rng(0)
    write_video(root / "a.mp4", rng.integers(0, 255, (20, 48, 80, 3), dtype=np.uint8), fps=8)
    write_video(root / "b.mp4", rng.integers(0, 255, (12, 64, 64, 3), dtype=np.uint8), fps=8)
    (root / "broken.mp4").write_bytes(b"not a video")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_video_folder_clips_from_both_annotation_formats(tmp_path, suffix):
    _write_videos(tmp_path)
    names = ["a.mp4", "b.mp4", "broken.mp4"]
    if suffix == ".jsonl":
        text = "".join(json.dumps({"video": n, "text": "noise"}) + "\n" for n in names)
    else:
        text = "path,text\n" + "".join(f"{n},noise\n" for n in names)
    (tmp_path / f"videos{suffix}").write_text(text)
    clips = VideoFolderClips(tmp_path / f"videos{suffix}", (17, 32, 32), seed=0)
    assert [v.path.name for v in clips.videos] == ["a.mp4"]  # b is shorter than 17 frames, broken does not decode
    clip = clips(3)
    assert clip.shape == (3, 17, 32, 32) and -1 <= clip.min() and clip.max() <= 1
    assert torch.equal(clip, clips(3))


def test_a_run_on_a_video_folder(tmp_path):
    _write_videos(tmp_path)
    (tmp_path / "videos.csv").write_text("path,text\na.mp4,noise\nb.mp4,noise\n")
    out = tmp_path / "out"
    result = distill(out, f"data.annotations={tmp_path / 'videos.csv'}", "data.patch=[9,32,32]", "train.max_steps=2")
    assert result.exit_code == 0, result.output
    assert verify_artifact(out) == []


def _no_vae_parent(root: Path) -> Path:
    folder = root / "no_vae"
    folder.mkdir()
    spec = json.loads((TEACHER / "pipeline.json").read_text())
    del spec["components"]["vae"]
    (folder / "pipeline.json").write_text(json.dumps(spec))
    return folder


@pytest.mark.parametrize("case", ["no_encoder", "no_readable_video", "patch", "family"])
def test_user_mistakes_exit_2_with_one_line_and_nothing_written(tmp_path, case):
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    (tmp_path / "videos.jsonl").write_text(json.dumps({"video": "broken.mp4", "text": "x"}) + "\n")
    extra = {
        "no_encoder": [f"parent={_no_vae_parent(tmp_path)}"],
        "no_readable_video": [f"data.annotations={tmp_path / 'videos.jsonl'}"],
        "patch": ["data.patch=[10,64,64]"],
        "family": ["decoder.family=taehv-4x"],
    }[case]
    out = tmp_path / "out"
    result = distill(out, *extra, "train.max_steps=1")
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists() and not out.with_name("out.work").exists()
