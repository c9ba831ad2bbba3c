"""`neodragon train` under `torchrun --nproc_per_node 2` (gloo, CPU): the ranks share each global batch
and end with the weights of one process that sees the same batches; rank 0 alone encodes the latent
caches and writes the artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from neodragon_cli import recipes as R
from neodragon_cli.app import app
from neodragon_cli.artifacts import read_state, verify_artifact
from neodragon_cli.pipelines.train.trainer import seed_everything
from torchrun_cli import MARKS, run_neodragon

pytestmark = MARKS

WORLD = ["world.height=64", "world.width=64", "world.frames=9"]
TRAIN = ["train.max_steps=2", "train.warmup_steps=0", "train.checkpoint_every=0", "train.log_every=1"]
# Deterministic loss (posterior mean, no critic, no latent noise): 2 ranks x 1 clip = 1 process x 2 clips.
# Adam's eps well above rounding noise (Adam moves a weight whose gradient is only noise by a whole lr).
VAE = ["shapes/teacher_vae", *WORLD, *TRAIN, "train.batch_size=2", "train.lr=1e-2", "train.eps=1e-3", "data.clip_frames=9",
       "data.crop=32", "data.norm_videos=1", "data.judge_videos=0", "model.block_out_channels=[8,8,8,8]",
       "model.norm_num_groups=4"]


def _torchrun(args: list[str], out: Path) -> str:
    return run_neodragon(["train", *args, "-o", str(out)], timeout=300)


def _one_process(args: list[str], out: Path) -> None:
    result = CliRunner().invoke(app, ["train", *args, "-o", str(out)])
    assert result.exit_code == 0, result.output


def _assert_same_training(one: Path, two: Path, recipe: list[str]) -> None:
    """Per tensor, the two runs' weights differ by under 1% of how far training moved them: rounding in
    the all-reduce, not other batches or another start."""
    loaded = R.load(recipe[0], recipe[1:])
    seed_everything(loaded.train.seed)
    start = loaded.model.build().state_dict()
    first, second = load_file(str(one)), load_file(str(two))
    assert set(first) == set(second) == set(start)
    moved = 0
    for name, value in first.items():
        distance = float((value - start[name]).abs().max())
        moved += distance > 1e-3
        assert float((second[name] - value).abs().max()) <= 0.01 * distance + 1e-7, name
    assert moved > len(first) / 2


def _assert_written_once(out: Path, steps: int) -> None:
    """One metrics line per step (not per rank), the latest checkpoint alone, an artifact that verifies
    and no second rank's partial artifact beside it."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, steps + 1))
    assert verify_artifact(out) == []
    assert not list(out.parent.glob(f".{out.name}.*"))


@pytest.fixture(scope="module")
def vae_runs(tmp_path_factory) -> tuple[Path, Path]:
    """The artifacts of train-vae in one process and on two ranks."""
    root = tmp_path_factory.mktemp("vae")
    torch.set_num_threads(1)
    _one_process(VAE, root / "one")
    _torchrun(VAE, root / "two")
    return root / "one", root / "two"


def test_train_vae_on_two_ranks_matches_one_process_with_the_combined_batch(vae_runs):
    single, ranks = vae_runs
    _assert_same_training(single / "vae" / "diffusion_pytorch_model.safetensors",
                          ranks / "vae" / "diffusion_pytorch_model.safetensors", VAE)
    _assert_written_once(ranks, steps=2)
    assert [p.name for p in (ranks.parent / "two.work" / "checkpoints").iterdir()] == ["step-00000002.pt"]
    assert read_state(ranks)["operations"][-1]["results"]["steps"] == 2


def test_train_t2v_on_two_ranks_encodes_the_caches_once_and_matches_accumulation(vae_runs, tmp_path):
    vae = vae_runs[0]
    t2v = ["shapes/teacher_t2v", *WORLD, *TRAIN, "train.batch_size=8", f"data.vae={vae}", "data.videos=4",
           "data.images=4", "data.image_share=0.5", "text.t5_width=32", "text.clip_width=32", "text.pooled_dim=16",
           "mmdit.num_layers=1", "mmdit.num_attention_heads=2", "mmdit.attention_head_dim=16"]
    output = _torchrun(t2v, tmp_path / "two")
    # rank 0 encodes and writes the caches; rank 1 waits, then reads them
    assert output.count("encoding videos") == output.count("encoding first frames") == 1
    assert output.count("latent cache (4, 16, 2, 8, 8) ready") == output.count("image cache (4, 16, 1, 8, 8) ready") == 2
    # the random draws follow each micro-batch's first sample: 2 ranks x 4 = 1 process x 2 accumulated x 4
    _one_process([*t2v, "train.grad_accum=2"], tmp_path / "one")
    for part in ("mmdit", "text"):
        for name in sorted(p.name for p in (tmp_path / "one" / part).glob("*.safetensors")):
            first, second = (load_file(str(tmp_path / run / part / name)) for run in ("one", "two"))
            for key, value in first.items():
                torch.testing.assert_close(second[key], value, rtol=1e-4, atol=1e-5, msg=key)
    _assert_written_once(tmp_path / "two", steps=2)
    for cache in ("latents", "images"):
        torch.testing.assert_close(load_file(str(tmp_path / "two.work" / f"{cache}.safetensors"))["latents"],
                                   load_file(str(tmp_path / "one.work" / f"{cache}.safetensors"))["latents"])
