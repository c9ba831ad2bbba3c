"""Drop-one guidance and the visual/text rank correlation on a tiny real-architecture pipeline
(`test_prune.tiny_pipeline`): every number is recomputed here from videos generated independently
with `without_blocks`, the eval judge and the eval metrics; a block that is the identity gives
identical videos when dropped and is the one the guided policy removes; the report merges into a
`prune scores` folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_prune import tiny_pipeline

from neodragon_cli import load_component
from neodragon_cli.errors import UsageError
from neodragon_cli.pipelines.distill.block_importance import rank_correlation, write_report
from neodragon_cli.pipelines.distill.drop_one import LABEL_WIDTH, PSNR_IDENTICAL, measure_drop_one
from neodragon_cli.pipelines.distill.prune import choose_blocks, measure_scores
from neodragon_cli.pipelines.eval.judge import judge
from neodragon_cli.pipelines.eval.metrics import psnr, ssim
from neodragon_cli.pipelines.flow.pipeline import VideoPipeline, sample_seed

PROMPTS = ["a red circle moving left", "a blue square resting"]


def test_rank_correlation():
    def blocks(visual, text):
        return [{"block": k, "visual": v, "text": t} for k, (v, t) in enumerate(zip(visual, text))]

    same = rank_correlation(blocks([0.1, 0.3, 0.2, 0.05], [1.0, 3.0, 2.0, None]))  # the last block has no text score
    assert same == {"spearman_visual_text": pytest.approx(1.0), "blocks": 3}
    assert rank_correlation(blocks([0.1, 0.3, 0.2], [3.0, 1.0, 2.0]))["spearman_visual_text"] == pytest.approx(-1.0)
    # ranks visual (1, 2.5, 2.5, 4), text (2, 1, 4, 3): Pearson of the ranks
    rv, rt = np.array([1, 2.5, 2.5, 4]), np.array([2, 1, 4, 3])
    expected = float(np.corrcoef(rv, rt)[0, 1])
    assert rank_correlation(blocks([0.1, 0.2, 0.2, 0.4], [0.2, 0.1, 0.4, 0.3]))["spearman_visual_text"] == pytest.approx(expected)
    assert rank_correlation(blocks([0.1, 0.2], [0.2, 0.1]))["spearman_visual_text"] is None  # too few blocks
    assert rank_correlation(blocks([0.1, 0.1, 0.1], [0.2, 0.1, 0.3]))["spearman_visual_text"] is None  # constant


def test_reports_carry_the_rank_correlation(tmp_path):
    blocks = [{"block": k, "visual": v, "text": t} for k, (v, t) in enumerate([(0.1, 0.3), (0.2, 0.2), (0.3, 0.1), (0.2, None)])]
    report = write_report(tmp_path, blocks, model="m")
    assert report["rank_correlation"] == {"spearman_visual_text": pytest.approx(-1.0), "blocks": 3}
    assert json.loads((tmp_path / "scores.json").read_text())["rank_correlation"]["blocks"] == 3


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    """The tiny 4-block pipeline with block 1 made the identity (AdaLN-Zero gates at 0)."""
    folder = tiny_pipeline(tmp_path_factory.mktemp("guidance"))
    mmdit = load_component("mmdit", folder / "mmdit")
    block = mmdit.transformer_blocks[1]
    with torch.no_grad():
        for linear in (block.norm1.linear, block.norm1_context.linear):
            linear.weight.zero_()
            linear.bias.zero_()
    mmdit.save_pretrained(folder / "mmdit")
    return folder


@pytest.fixture(scope="module")
def report(parent, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("report") / "report"
    return out, measure_drop_one(parent, PROMPTS, videos_per_prompt=1, seed=0, report_dir=out)


def test_numbers_are_recomputed_from_independent_generations(parent, report, one_thread):
    _, written = report
    pipeline = VideoPipeline.from_pretrained(parent, safety_checker=False)
    settings = pipeline.settings()
    full = pipeline.mmdit
    references = [pipeline.generate(p, settings, seed=sample_seed(0, p, 0)).frames for p in PROMPTS]
    assert written["drop_one"]["full_model"]["total"] == pytest.approx(np.mean([judge(f, p).total for f, p in zip(references, PROMPTS)]))
    for k in (0, 2):
        pipeline.mmdit = full.without_blocks([k])
        drop = written["blocks"][k]["drop_one"]
        mse = []
        for i, prompt in enumerate(PROMPTS):
            frames = pipeline.generate(prompt, settings, seed=sample_seed(0, prompt, 0)).frames
            row = drop["videos"][i]
            assert (row["prompt"], row["seed"]) == (prompt, sample_seed(0, prompt, 0))
            assert row["psnr"] == pytest.approx(psnr(frames, references[i]), rel=1e-12)
            assert row["ssim"] == pytest.approx(ssim(frames, references[i]), rel=1e-12)
            assert row["total"] == pytest.approx(judge(frames, prompt).total, rel=1e-12)
            mse.append(np.mean((frames.astype(np.float64) - references[i]) ** 2))
        assert drop["psnr"] == pytest.approx(10 * np.log10(255**2 / np.mean(mse)))
        assert drop["psnr"] < 60 and drop["total_drop"] == pytest.approx(written["drop_one"]["full_model"]["total"] - drop["total"])


def test_an_identity_block_drops_without_a_trace_and_guided_removes_it(report):
    out, written = report
    blocks = written["blocks"]
    assert blocks[1]["drop_one"]["psnr"] == PSNR_IDENTICAL and blocks[1]["drop_one"]["ssim"] == pytest.approx(1.0)
    assert blocks[1]["drop_one"]["total_drop"] == 0
    assert blocks[3]["drop_one"] is None  # the last block cannot be removed
    assert choose_blocks("guided", 1, json.loads((out / "scores.json").read_text())["blocks"], 4) == [1]
    assert written["rank_correlation"] == rank_correlation(blocks)


def test_contact_sheets(report):
    out, written = report
    assert written["drop_one"]["sheets"] == ["drop_one/prompt-000.png", "drop_one/prompt-001.png"]
    with Image.open(out / "drop_one" / "prompt-000.png") as sheet:
        # 4 rows (full model + blocks 0..2) of 64 px under a 16 px header; 8 frames of the 9 (0,1,2,3,5,6,7,8)
        assert sheet.size == (LABEL_WIDTH + 8 * 64, 16 + 4 * 64)
        pixels = np.asarray(sheet)
    assert pixels[16:, LABEL_WIDTH:].std() > 1  # frames, not a blank canvas


def test_merges_into_a_scores_report_and_refuses_what_it_must(parent, tmp_path):
    out = tmp_path / "report"
    scores = measure_scores(parent, PROMPTS[:1], 1, 0, out)
    merged = measure_drop_one(parent, PROMPTS[:1], videos_per_prompt=1, seed=0, report_dir=out)
    for before, after in zip(scores["blocks"], merged["blocks"]):
        assert {k: after[k] for k in before} == before  # the measured BI scores are kept
    assert {k: merged[k] for k in ("model", "prompts", "videos_per_prompt", "seed")} == \
        {k: scores[k] for k in ("model", "prompts", "videos_per_prompt", "seed")}
    assert merged["drop_one"]["prompts"] == 1 and all(b["drop_one"] for b in merged["blocks"][:3])
    with pytest.raises(UsageError, match="already holds drop-one"):
        measure_drop_one(parent, PROMPTS[:1], videos_per_prompt=1, seed=0, report_dir=out)
    other = tmp_path / "other"
    other.mkdir()
    (other / "scores.json").write_text(json.dumps({**scores, "model": "elsewhere"}))
    with pytest.raises(UsageError, match="scores another model"):
        measure_drop_one(parent, PROMPTS[:1], videos_per_prompt=1, seed=0, report_dir=other)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match="not empty"):
        measure_drop_one(parent, PROMPTS[:1], videos_per_prompt=1, seed=0, report_dir=busy)
    with pytest.raises(UsageError, match="no calibration prompts"):
        measure_drop_one(parent, [], videos_per_prompt=1, seed=0, report_dir=tmp_path / "empty")
    assert not (tmp_path / "empty").exists()


def test_block_importance_of_the_guidance_run_equals_prune_scores(parent, report, tmp_path):
    _, written = report
    scores = measure_scores(parent, PROMPTS, 1, 0, tmp_path / "scores")
    assert [(b["visual"], b["text"], b["text_per_pass"]) for b in scores["blocks"]] == \
        [(b["visual"], b["text"], b["text_per_pass"]) for b in written["blocks"]]
