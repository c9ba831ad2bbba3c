"""`prune` on tiny real-architecture models: block importance from recorded forwards (an identity
block scores 0), block removal in the published layout (outputs equal the unpruned model with those
blocks skipped; the real 24 -> 18 parameter count; the Neodragon 18-block layout), block policies and
mappings, and the command end to end on a tiny pipeline built here (scores report, both stages, the
artifact verifies and generates, bit-exact resume of both stages, one-line usage errors)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from neodragon_cli import load_component
from neodragon_cli.app import app
from neodragon_cli.artifacts import read_state, verify_artifact
from neodragon_cli.atomic import write_json
from neodragon_cli.errors import UsageError
from neodragon_cli.pipelines.data.shapes import prompt_corpus
from neodragon_cli.pipelines.distill.block_importance import ImportanceAccumulator, block_calls, token_cosines
from neodragon_cli.pipelines.distill.prune import choose_blocks, mapped_teacher_blocks
from neodragon_cli.pipelines.models.causal_vae import CausalVideoVAE
from neodragon_cli.pipelines.models.checkpoint import count_parameters
from neodragon_cli.pipelines.models.mmdit import PyramidFlowMMDiT, check_removable_blocks, mmdit_from_preset
from neodragon_cli.pipelines.models.text_encoders import T5TextEncoder, TextEncoderBundle, t5_config, train_t5_tokenizer

runner = CliRunner()


def tiny_mmdit(num_layers: int = 4, seed: int = 0) -> PyramidFlowMMDiT:
    """Width 16 (2 heads x 8), T5 width 16, no pooled input; random weights (a fresh one is the identity)."""
    torch.manual_seed(seed)
    model = PyramidFlowMMDiT(sample_size=8, num_layers=num_layers, attention_head_dim=8, num_attention_heads=2,
                             caption_projection_dim=16, pooled_projection_dim=0, pos_embed_max_size=16,
                             joint_attention_dim=16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def tiny_pipeline(root: Path, num_layers: int = 4) -> Path:
    """A pipeline folder: tiny T5 bundle, a `num_layers`-block tiny MMDiT, a tiny causal VAE; 64x64,
    9 frames, 1 step per stage with CFG."""
    torch.manual_seed(0)
    folder = root / "parent"
    tokenizer = train_t5_tokenizer(prompt_corpus(200, 0, "train"), root / "tokenizer", vocab_size=48)
    t5 = T5TextEncoder(t5_config(vocab_size=len(tokenizer), d_model=16, num_layers=1, num_heads=2, d_ff=32, d_kv=8))
    TextEncoderBundle(tokenizer, t5, max_length=16).save_pretrained(folder / "text")
    tiny_mmdit(num_layers).save_pretrained(folder / "mmdit")
    CausalVideoVAE(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                   encoder_layers_per_block=(1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
                   encoder_norm_num_groups=4, decoder_norm_num_groups=4).save_pretrained(folder / "vae")
    write_json(folder / "pipeline.json", {
        "format": "neodragon-pipeline/1",
        "components": {"text_encoder": {"component": "text/bundle", "path": "text"},
                       "mmdit": {"component": "mmdit/pyramid-flow", "path": "mmdit"},
                       "vae": {"component": "vae/pyramid-flow", "path": "vae"}},
        "latent_norm": {"image_shift": 0.0, "image_scale": 1.0, "video_shift": 0.0, "video_scale": 1.0},
        "sampling": {"mode": "monolithic", "first_steps": [1, 1, 1], "video_steps": [1, 1, 1], "guidance": 3.0,
                     "video_guidance": 2.0, "frames": 9, "height": 64, "width": 64, "fps": 8, "negative_prompt": ""},
    })
    return folder


def forward(model: PyramidFlowMMDiT, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(**model.example_inputs(batch=2))[0]


# ---------------------------------------------------------------------------------------------- scores


def recorded_scores(model: PyramidFlowMMDiT) -> list[dict]:
    accumulator = ImportanceAccumulator(len(model.transformer_blocks))
    with block_calls(model, accumulator):
        forward(model)
    return accumulator.scores()


def test_scores_are_reproducible_and_computed_from_the_recorded_forward():
    model = tiny_mmdit()
    calls = []
    with block_calls(model, lambda k, args, out: calls.append((k, args[0], args[1], args[3], out))):
        forward(model)
    scores = recorded_scores(model)
    assert scores == recorded_scores(model)
    assert [s["block"] for s in scores] == [0, 1, 2, 3]
    for k, x, c, valid, (x_out, c_out) in calls:
        # example_inputs: batch 2 = one CFG call, rows [uncond; cond]
        assert scores[k]["visual"] == pytest.approx(1 - float(token_cosines(x, x_out).mean()), abs=1e-12)
        if c_out is None:
            assert k == 3 and scores[k]["text"] is None and scores[k]["text_per_pass"] == {"uncond": None, "cond": None}
            continue
        cos = token_cosines(c, c_out)
        assert scores[k]["text"] == pytest.approx(1 - float(cos[valid].mean()), abs=1e-12)
        assert scores[k]["text_per_pass"]["cond"] == pytest.approx(1 - float(cos[1][valid[1]].mean()), abs=1e-12)
        assert scores[k]["text_per_pass"]["uncond"] == pytest.approx(1 - float(cos[0][valid[0]].mean()), abs=1e-12)
    assert all(s["visual"] > 1e-3 for s in scores)


def test_an_identity_block_scores_zero():
    model = tiny_mmdit()
    block = model.transformer_blocks[1]
    with torch.no_grad():  # AdaLN-Zero gates at 0: the block passes both streams through unchanged
        for linear in (block.norm1.linear, block.norm1_context.linear):
            linear.weight.zero_()
            linear.bias.zero_()
    scores = recorded_scores(model)
    assert scores[1]["visual"] == pytest.approx(0, abs=1e-12) and scores[1]["text"] == pytest.approx(0, abs=1e-12)
    assert scores[0]["visual"] > 1e-3 and scores[2]["visual"] > 1e-3


# ---------------------------------------------------------------------------------------------- removal


def test_pruned_model_equals_the_unpruned_one_with_those_blocks_skipped(tmp_path):
    model = tiny_mmdit()
    skipping = copy.deepcopy(model)
    for k in (0, 2):  # a forward hook's return value replaces the block's output
        skipping.transformer_blocks[k].register_forward_hook(lambda m, args, out: (args[0], args[1]))
    pruned = model.without_blocks([2, 0])
    assert pruned.config["num_layers"] == 2
    torch.testing.assert_close(forward(pruned), forward(skipping), rtol=0, atol=0)
    assert not torch.equal(forward(pruned), forward(model))

    pruned.save_pretrained(tmp_path / "mmdit")
    assert json.loads((tmp_path / "mmdit" / "config.json").read_text())["num_layers"] == 2
    with safe_open(str(tmp_path / "mmdit" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert not any(k.startswith("transformer_blocks.2.") for k in keys)
        original = model.state_dict()
        for key in original:  # block 1 -> 0, block 3 -> 1
            for old, new in ((1, 0), (3, 1)):
                if key.startswith(f"transformer_blocks.{old}."):
                    renamed = key.replace(f"transformer_blocks.{old}.", f"transformer_blocks.{new}.", 1)
                    assert torch.equal(f.get_tensor(renamed), original[key])
    reloaded = load_component("mmdit", tmp_path / "mmdit")
    torch.testing.assert_close(forward(reloaded), forward(pruned), rtol=0, atol=0)


def test_real_size_24_to_18_blocks_and_the_neodragon_layout():
    with torch.device("meta"):
        full = mmdit_from_preset("pyramid-flow-sd3-2b")
        neodragon = mmdit_from_preset("neodragon-18")
    assert count_parameters(full) == 2_028_334_144  # the paper's 2.028 B
    pruned = full.without_blocks([2, 5, 8, 11, 14, 17])
    assert count_parameters(pruned) == 1_518_448_192  # the paper's 1.518 B
    # The released Neodragon 18-block model is this pruned layout without the context embedder
    # (6,292,992 parameters: its ContextAdapter feeds the blocks at their width).
    shapes = {k: v.shape for k, v in pruned.state_dict().items() if not k.startswith("context_embedder.")}
    assert shapes == {k: v.shape for k, v in neodragon.state_dict().items()}
    assert count_parameters(neodragon) == 1_518_448_192 - 6_292_992


@pytest.mark.parametrize("indices, message", [
    ([4], "out of range"), ([-1], "out of range"), ([0, 1, 2, 3], "every block"), ([3], "last block"),
])
def test_blocks_that_cannot_be_removed(indices, message):
    with pytest.raises(UsageError, match=message):
        check_removable_blocks(indices, 4)


# ---------------------------------------------------------------------------------------------- policies


SCORES = [
    {"block": 0, "visual": 0.5, "text": 0.1, "drop_one": {"psnr": 20.0}},
    {"block": 1, "visual": 0.1, "text": 0.6, "drop_one": {"psnr": 30.0}},
    {"block": 2, "visual": 0.3, "text": 0.2, "drop_one": {"psnr": 40.0}},
    {"block": 3, "visual": 0.2, "text": 0.4, "drop_one": {"psnr": 10.0}},
    {"block": 4, "visual": 0.0, "text": None, "drop_one": {"psnr": 50.0}},
]


def test_block_policies():
    assert choose_blocks("visual", 2, SCORES, 5) == [1, 3]  # the last block (4) is never a candidate
    assert choose_blocks("text", 2, SCORES, 5) == [0, 2]
    assert choose_blocks("mean", 2, SCORES, 5) == [0, 2]  # means 0.3, 0.35, 0.25, 0.3
    assert choose_blocks("guided", 1, SCORES, 5) == [2]  # lowest mean and highest drop-one PSNR
    assert choose_blocks("explicit", 0, [], 5, [3, 1]) == [1, 3]
    with pytest.raises(UsageError, match="drop-one"):
        choose_blocks("guided", 1, [{k: v for k, v in s.items() if k != "drop_one"} for s in SCORES], 5)
    with pytest.raises(UsageError, match="every block"):
        choose_blocks("mean", 5, SCORES, 5)


def test_mappings():
    kept = [0, 3, 4, 7]  # of 8 blocks
    assert mapped_teacher_blocks(kept, "simple") == [0, 3, 4, 7]
    assert mapped_teacher_blocks(kept, "next-block") == [2, 3, 6, 7]


# ---------------------------------------------------------------------------------------------- command


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    return tiny_pipeline(tmp_path_factory.mktemp("prune"))


TINY = ["world.height=64", "world.width=64", "world.frames=9", "data.videos=4", "calibration.shapes_prompts=2",
        "calibration.videos_per_prompt=1", "train.batch_size=4", "train.lr=1e-3", "train.precision=fp32",
        "train.log_every=1", "train.checkpoint_every=0", "stage1.steps=3", "stage2.steps=3"]


def prune(parent: Path, out: Path, *extra: str, resume: bool = False):
    args = ["prune", "shapes/prune", f"parent={parent}", *TINY, *extra, "-o", str(out)]
    return runner.invoke(app, args + (["--resume", "--overwrite"] if resume else []))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "mmdit" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_scores_command_writes_report_and_chart(parent, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\na blue square resting\n")
    out = tmp_path / "report"
    result = runner.invoke(app, ["prune", "scores", str(parent), "-o", str(out), "--prompts", str(prompts),
                                 "--videos-per-prompt", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "scores.json").read_text())
    assert report["prompts"] == 2 and len(report["blocks"]) == 4
    assert report["blocks"][3]["text"] is None and all(b["visual"] > 0 for b in report["blocks"])
    assert all(b["text_per_pass"]["uncond"] is not None for b in report["blocks"][:3])  # CFG: both passes seen
    assert (out / "block_importance.png").read_bytes()[:4] == b"\x89PNG"
    again = tmp_path / "again"
    assert runner.invoke(app, ["prune", "scores", str(parent), "-o", str(again), "--prompts", str(prompts),
                               "--videos-per-prompt", "1"]).exit_code == 0
    assert json.loads((again / "scores.json").read_text())["blocks"] == report["blocks"]


def test_prune_writes_a_verified_pipeline_that_generates(parent, tmp_path):
    out = tmp_path / "pruned"
    result = prune(parent, out, "blocks.policy=mean", "blocks.remove=2", "stage2.mapping=next-block")
    assert result.exit_code == 0, result.output
    assert verify_artifact(out) == []
    operation = read_state(out)["operations"][-1]
    assert operation["operation"] == "prune"
    results = operation["results"]
    assert len(results["removed_blocks"]) == 2 and 3 not in results["removed_blocks"]
    assert results["num_layers"] == [4, 2] and results["stage1_steps"] == 3 and results["stage2_steps"] == 3
    assert (out.with_name("pruned.work") / "scores" / "scores.json").is_file()
    model = load_component("mmdit", out / "mmdit")
    assert model.config["num_layers"] == 2
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["stage"] for line in lines] == [1, 1, 1, 2, 2, 2]
    assert {"feature_visual", "feature_text", "teacher_fm", "data_fm"} <= set(lines[-1])
    video = tmp_path / "v.mp4"
    generated = runner.invoke(app, ["generate", "a red circle moving left", "--model", str(out), "-o", str(video)])
    assert generated.exit_code == 0, generated.output
    assert video.stat().st_size > 0


def test_both_stages_resume_bit_exactly(parent, tmp_path):
    run = ["blocks.policy=explicit", "blocks.explicit=[1]", "stage1.steps=4", "stage2.steps=4",
           "train.checkpoint_every=2", "train.keep_every=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert prune(parent, straight, *run).exit_code == 0
    assert prune(parent, resumed, *run).exit_code == 0
    work = resumed.with_name("resumed.work")
    (work / "stage2" / "checkpoints" / "step-00000004.pt").unlink()  # stage 2 resumes from step 2
    result = prune(parent, resumed, *run, resume=True)
    assert result.exit_code == 0, result.output
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for path in (work / "stage2" / "checkpoints").glob("*.pt"):
        path.unlink()
    (work / "stage1" / "checkpoints" / "step-00000004.pt").unlink()  # stage 1 from step 2, stage 2 anew
    result = prune(parent, resumed, *run, resume=True)
    assert result.exit_code == 0, result.output
    b = weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra, message", [
    (["blocks.policy=explicit", "blocks.explicit=[7]"], "out of range"),
    (["blocks.policy=explicit", "blocks.explicit=[0,1,2,3]"], "every block"),
    (["blocks.policy=explicit", "blocks.explicit=[3]"], "last block"),
    (["blocks.policy=mean", "blocks.remove=4"], "every block"),
])
def test_bad_blocks_exit_2_with_one_line_and_nothing_written(parent, tmp_path, extra, message):
    out = tmp_path / "out"
    result = prune(parent, out, *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists() and not out.with_name("out.work").exists()


def test_no_calibration_prompts_exit_2(parent, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    out = tmp_path / "report"
    result = runner.invoke(app, ["prune", "scores", str(parent), "-o", str(out), "--prompts", str(empty)])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()
    result = prune(parent, tmp_path / "out", f"calibration.prompts={empty}")
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.work" / "scores").exists()
