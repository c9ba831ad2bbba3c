"""`neodragon generate --prompts-file` under `torchrun --nproc_per_node 2` (gloo, CPU): the ranks share
the videos out and together write the same files, byte for byte, as one process; rank 0 alone writes
the batch report, which lists every video."""

from __future__ import annotations

import json
from pathlib import Path

from torchrun_cli import MARKS, run_neodragon
from test_generate import tiny_model  # noqa: F401 -- the module-scoped tiny pipeline fixture

pytestmark = MARKS


def test_two_ranks_write_the_files_of_one_process(tiny_model, tmp_path):  # noqa: F811
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\na blue square moving right\na green triangle resting\n")
    common = ["--prompts-file", str(prompts), "--model", str(tiny_model), "--num-samples", "1", "--frames", "9",
              "--first-steps", "1-1-1", "--steps", "1-1-1"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    run_neodragon(["generate", *common, "-o", str(one)], ranks=1, timeout=300)
    log = run_neodragon(["generate", *common, "-o", str(two), "--json", str(tmp_path / "two.json")], timeout=300)
    videos = sorted(p.name for p in one.glob("*.mp4"))
    assert len(videos) == 3 and sorted(p.name for p in two.glob("*.mp4")) == videos
    assert all((one / name).read_bytes() == (two / name).read_bytes() for name in videos)
    assert not list(two.glob(".*"))  # no temporary file left by either rank
    report = json.loads((tmp_path / "two.json").read_text())
    assert [Path(v["video"]).name for v in report["videos"]] == videos and report["summary"]["written"] == 3
    assert log.count("3 videos: 3 written") == 1
