"""Mistakes a user makes on the command line are told apart from failures: an unknown option or a bad
value exits 2 with the usage line; an output path that cannot be written, or an existing video without
--overwrite, is refused (exit 2, one line) before any model is loaded. None of them says "unexpected"."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from neodragon_cli.app import app
from neodragon_cli.errors import CheckpointError

runner = CliRunner()


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading a model fails with a sentinel error: a refusal seen instead happened before any load."""
    from neodragon_cli.pipelines.flow.pipeline import VideoPipeline

    def refuse(*args, **kwargs):
        raise CheckpointError("sentinel: a model was loaded")

    monkeypatch.setattr(VideoPipeline, "from_pretrained", refuse)


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("not a folder\n")
    return path


def _refused(result, *needles, code=2):
    assert result.exit_code == code, result.output
    assert "unexpected" not in result.output and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in result.output, result.output


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "x", "-o", "out.mp4", "--bogus"],
        ["eval", "clip.mp4", "--bogus"],
        ["train", "shapes/teacher_vae", "-o", "out", "--bogus"],
        ["recipes", "validate", "shapes/teacher_vae", "--bogus"],
        ["shapes", "sample", "out", "--bogus"],
        ["components", "list", "--bogus"],
        ["--bogus"],
    ],
)
def test_unknown_option_exits_2_with_the_usage_line(args):
    _refused(runner.invoke(app, args), "Usage:", "No such option: --bogus")


@pytest.mark.parametrize(
    "args,option",
    [
        (["generate", "x", "-o", "out.mp4", "--frames", "many"], "--frames"),
        (["generate", "x", "-o", "out.mp4", "--guidance", "high"], "--guidance"),
        (["shapes", "sample", "out", "--count", "0"], "--count"),
        (["shapes", "prompts", "-", "--count", "some"], "--count"),
    ],
)
def test_bad_value_exits_2_with_the_usage_line(args, option):
    _refused(runner.invoke(app, args), "Usage:", f"Invalid value for '{option}'")


def test_missing_argument_exits_2_with_the_usage_line():
    _refused(runner.invoke(app, ["recipes", "validate"]), "Usage:", "Missing argument")


def test_generate_output_under_a_file_is_refused_before_loading(no_model_loading, a_file):
    result = runner.invoke(app, ["generate", "a red circle", "-o", str(a_file / "sub" / "out.mp4")])
    _refused(result, "is a file", str(a_file))
    result = runner.invoke(app, ["generate", "a red circle", "-o", str(a_file.parent / "ok.mp4"), "--json", str(a_file / "run.json")])
    _refused(result, "is a file")


def test_generate_output_in_a_read_only_folder_is_refused_before_loading(no_model_loading, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    real_access = os.access  # root may write anyway: the folder reads as read-only to the check all the same
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == locked else real_access(path, mode))
    try:
        _refused(runner.invoke(app, ["generate", "a red circle", "-o", str(locked / "new" / "out.mp4")]), "not writable", str(locked))
    finally:
        locked.chmod(0o755)


def test_generate_refuses_an_existing_video_without_overwrite(no_model_loading, tmp_path):
    existing = tmp_path / "out.mp4"
    existing.write_bytes(b"an earlier video")
    _refused(runner.invoke(app, ["generate", "a red circle", "-o", str(existing)]), "already exists", "--overwrite")
    assert existing.read_bytes() == b"an earlier video"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "001-a-blue-square.mp4").write_bytes(b"an earlier video")
    _refused(runner.invoke(app, ["generate", "--prompts-file", str(prompts), "-o", str(videos)]), "already exists", "001-a-blue-square.mp4")
    # with --overwrite the checks pass and the (sentinel) model load is reached
    result = runner.invoke(app, ["generate", "a red circle", "-o", str(existing), "--overwrite"])
    _refused(result, "sentinel", code=1)


def test_reports_and_folders_under_a_file_are_refused(a_file, tmp_path):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")
    _refused(runner.invoke(app, ["eval", str(clip), "--prompts", str(a_file), "--json", str(a_file / "r.json")]), "is a file")
    _refused(runner.invoke(app, ["shapes", "prompts", str(a_file / "p.txt"), "-n", "3"]), "is a file")
    _refused(runner.invoke(app, ["shapes", "sample", str(a_file / "clips"), "-n", "1"]), "is a file")
    _refused(runner.invoke(app, ["components", "inspect", str(tmp_path), "--json", str(a_file / "c.json")]), "is a file")
    _refused(runner.invoke(app, ["train", "shapes/teacher_vae", "-o", str(a_file / "vae")]), "is a file")


def test_a_report_where_a_folder_is_is_refused(tmp_path):
    _refused(runner.invoke(app, ["shapes", "prompts", str(tmp_path), "-n", "3"]), "is a folder")
    _refused(runner.invoke(app, ["components", "inspect", str(tmp_path), "--json", str(tmp_path)]), "is a folder")
