"""`neodragon prune guidance` and the rank-correlation line of `prune scores`, end to end on the tiny
pipeline of the prune tests: the report it writes drives `prune RECIPE` with `blocks.policy=guided`;
bad options exit 2 with one line and write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner
from unit.test_prune import TINY, tiny_pipeline

from neodragon_cli.app import app
from neodragon_cli.artifacts import read_state

runner = CliRunner()


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    return tiny_pipeline(tmp_path_factory.mktemp("guidance-cli"))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red circle moving left\na blue square resting\na green triangle moving up\n")
    return path


def guidance(parent: Path, out: Path, *extra: str):
    return runner.invoke(app, ["prune", "guidance", str(parent), "-o", str(out), *extra])


def test_scores_prints_the_rank_correlation(parent, prompts, tmp_path):
    out = tmp_path / "scores"
    result = runner.invoke(app, ["prune", "scores", str(parent), "-o", str(out), "--prompts", str(prompts),
                                 "--videos-per-prompt", "1"])
    assert result.exit_code == 0, result.output
    rho = json.loads((out / "scores.json").read_text())["rank_correlation"]
    assert rho["blocks"] == 3 and -1 <= rho["spearman_visual_text"] <= 1
    assert f"over 3 blocks: {rho['spearman_visual_text']:+.3f}" in result.output


def test_guidance_report_drives_the_guided_policy(parent, prompts, tmp_path):
    report = tmp_path / "report"
    result = guidance(parent, report, "--prompts", str(prompts), "--max-prompts", "2", "--steps", "1-1-1", "--frames", "9")
    assert result.exit_code == 0, result.output
    scores = json.loads((report / "scores.json").read_text())
    assert scores["drop_one"]["prompts"] == 2 and scores["drop_one"]["settings"]["steps"] == [1, 1, 1]
    assert [b["drop_one"] is None for b in scores["blocks"]] == [False, False, False, True]
    assert all(len(b["drop_one"]["videos"]) == 2 for b in scores["blocks"][:3])
    assert sorted(p.name for p in (report / "drop_one").iterdir()) == ["prompt-000.png", "prompt-001.png"]
    for k in range(3):
        assert f"without block   {k}: PSNR {scores['blocks'][k]['drop_one']['psnr']:6.2f} dB" in result.output
    assert "Spearman rank correlation" in result.output

    again = guidance(parent, report, "--prompts", str(prompts), "--max-prompts", "2")
    assert again.exit_code == 2 and "already holds drop-one" in again.output

    out = tmp_path / "pruned"
    run = runner.invoke(app, ["prune", "shapes/prune", f"parent={parent}", *TINY, "blocks.policy=guided", "blocks.remove=1",
                              f"blocks.scores={report / 'scores.json'}", "stage1.steps=1", "stage2.steps=0", "-o", str(out)])
    assert run.exit_code == 0, run.output
    by_mean = sorted(range(3), key=lambda k: (scores["blocks"][k]["visual"] + scores["blocks"][k]["text"]) / 2)
    by_psnr = sorted(range(3), key=lambda k: -scores["blocks"][k]["drop_one"]["psnr"])
    rank = {k: by_mean.index(k) + by_psnr.index(k) for k in range(3)}
    removed = read_state(out)["operations"][-1]["results"]["removed_blocks"]
    assert len(removed) == 1 and rank[removed[0]] == min(rank.values())


@pytest.mark.parametrize("extra, message", [
    (["--steps", "1-x-1"], "--steps"),
    (["--frames", "10"], "frames must be 1 + 8k"),
    (["--max-prompts", "0"], "--max-prompts"),  # typer's own range check: its usage line, then the error
])
def test_bad_options_exit_2_and_nothing_written(parent, prompts, tmp_path, extra, message):
    out = tmp_path / "report"
    result = guidance(parent, out, "--prompts", str(prompts), *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output, result.output
    if "--max-prompts" not in extra:
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()


def test_empty_prompts_and_another_models_report_exit_2(parent, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    result = guidance(parent, tmp_path / "a", "--prompts", str(empty))
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "a").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "scores.json").write_text(json.dumps({"model": "elsewhere", "blocks": []}))
    result = guidance(parent, other)
    assert result.exit_code == 2 and "scores another model" in result.output, result.output
    assert sorted(p.name for p in other.iterdir()) == ["scores.json"]
