import json

import pytest

from neodragon_cli.artifacts import ArtifactWriter, applied_optimisations, folder_hash, read_state
from neodragon_cli.errors import ArtifactError


def test_artifact_written_atomically_with_state(tmp_path):
    out = tmp_path / "art"
    with ArtifactWriter(out, command="prune", recipe_yaml="command: prune\n") as art:
        assert not out.exists()  # assembled under a temporary name
        (art.path / "w.json").write_text("{}")
        art.log_metrics({"step": 1, "loss": 0.5})
        art.record("prune", kept=[0, 2])
    state = read_state(out)
    assert state["command"] == "prune" and state["parent"] is None
    assert state["optimisations"] == [{"optimisation": "prune", "command": "prune", "kept": [0, 2]}]
    assert set(state["files"]) == {"w.json", "recipe.yaml"}
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0]) == {"step": 1, "loss": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def test_failure_leaves_nothing(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(RuntimeError):
        with ArtifactWriter(out, command="x") as art:
            (art.path / "half.bin").write_bytes(b"1")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_non_empty_output_refused_unless_overwrite(tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ArtifactError, match="not empty"):
        ArtifactWriter(out, command="x")
    with ArtifactWriter(out, command="x", overwrite=True) as art:
        (art.path / "new.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["new.json", "state.json"]


def test_parent_chain_and_hash(tmp_path):
    parent = tmp_path / "parent"
    with ArtifactWriter(parent, command="distill-te") as art:
        (art.path / "a.safetensors").write_bytes(b"abc")
        art.record("distill-te", mode="RM")
    child = tmp_path / "child"
    with ArtifactWriter(child, command="prune", parent=parent) as art:
        art.record("prune")
    state = read_state(child)
    assert state["parent"]["hash"] == folder_hash(parent)
    assert applied_optimisations(child) == ["distill-te", "prune"]
    (parent / "a.safetensors").write_bytes(b"abd")
    assert folder_hash(parent) != state["parent"]["hash"]
