import json

import pytest

from neodragon_cli.artifacts import (
    FORMAT,
    ArtifactWriter,
    applied_operations,
    check_operation,
    files_digest,
    folder_hash,
    read_state,
    verify_artifact,
)
from neodragon_cli.errors import ArtifactError, UsageError


def _artifact(out, operation="train-vae", parent=None, payload=b"abc", **results):
    with ArtifactWriter(out, command=operation, recipe_yaml=f"command: {operation}\n", parent=parent) as art:
        (art.path / "w.safetensors").write_bytes(payload)
        art.record(operation, **results)
    return out


def test_artifact_written_atomically_with_state(tmp_path):
    out = tmp_path / "art"
    with ArtifactWriter(out, command="prune", recipe_yaml="command: prune\n") as art:
        assert not out.exists()  # assembled under a temporary name
        (art.path / "w.json").write_text("{}")
        art.log_metrics({"step": 1, "loss": 0.5})
        art.record("prune", kept=[0, 2])
    state = read_state(out)
    assert state["format"] == FORMAT
    [op] = state["operations"]
    assert op["operation"] == "prune" and op["parent"] is None and op["results"] == {"kept": [0, 2]}
    assert op["recipe_sha256"] and op["output"] == files_digest(state["files"])
    assert set(state["files"]) == {"w.json", "recipe.yaml", "metrics.jsonl"}
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0]) == {"step": 1, "loss": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["art"]
    assert verify_artifact(out) == []


def test_failure_leaves_nothing(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(RuntimeError):
        with ArtifactWriter(out, command="prune") as art:
            (art.path / "half.bin").write_bytes(b"1")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_non_empty_output_refused_unless_overwrite(tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ArtifactError, match="not empty"):
        ArtifactWriter(out, command="prune")
    with ArtifactWriter(out, command="prune", overwrite=True) as art:
        (art.path / "new.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["new.json", "state.json"]


def test_output_under_a_file_is_refused_before_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="is a file, not a folder"):
        ArtifactWriter(tmp_path / "file" / "sub" / "out", command="prune")


def test_chain_links_each_operation_to_its_parent(tmp_path):
    parent = _artifact(tmp_path / "parent", "distill-te", mode="rm")
    child = _artifact(tmp_path / "child", "prune", parent=parent, payload=b"xyz")
    state = read_state(child)
    first, second = state["operations"]
    assert second["parent"]["hash"] == folder_hash(parent) == first["output"]
    assert applied_operations(child) == ["distill-te", "prune"]
    assert verify_artifact(child) == []


def test_verify_names_the_first_mismatch(tmp_path):
    art = _artifact(tmp_path / "a")
    data = bytearray((art / "w.safetensors").read_bytes())
    data[0] ^= 1
    (art / "w.safetensors").write_bytes(bytes(data))
    problems = verify_artifact(art)
    assert len(problems) == 1 and "w.safetensors" in problems[0] and "does not match" in problems[0]


def test_verify_finds_missing_extra_files_and_broken_links(tmp_path):
    art = _artifact(tmp_path / "a")
    (art / "extra.txt").write_text("?")
    (art / "recipe.yaml").unlink()
    problems = verify_artifact(art)
    assert any("recipe.yaml: missing" in p for p in problems) and any("extra.txt: not recorded" in p for p in problems)

    child = _artifact(tmp_path / "child", "prune", parent=_artifact(tmp_path / "p", "distill-te"))
    state = json.loads((child / "state.json").read_text())
    state["operations"][1]["parent"]["hash"] = "0" * 64
    (child / "state.json").write_text(json.dumps(state))
    [problem] = verify_artifact(child)
    assert "operation 2 (prune)" in problem and "operation 1 (distill-te)" in problem


def test_verify_refuses_folders_without_a_chain(tmp_path):
    assert "no state.json" in verify_artifact(tmp_path)[0]
    (tmp_path / "state.json").write_text("{not json")
    assert "not valid JSON" in verify_artifact(tmp_path)[0]


def test_a_damaged_parent_is_refused_before_work(tmp_path):
    parent = _artifact(tmp_path / "parent", "distill-te")
    (parent / "w.safetensors").write_bytes(b"changed")
    with pytest.raises(ArtifactError, match="does not verify"):
        ArtifactWriter(tmp_path / "child", command="prune", parent=parent)
    assert not (tmp_path / "child").exists()


def test_operation_order_rules():
    check_operation("prune", ["train-t2v", "distill-te"])
    check_operation("quantize", ["train-t2v", "export"])
    with pytest.raises(UsageError, match="prune cannot follow step-distill"):
        check_operation("prune", ["train-t2v", "step-distill"])
    with pytest.raises(UsageError, match="cannot follow export"):
        check_operation("distill-te", ["export"])
    with pytest.raises(UsageError, match="needs a parent that went through export"):
        check_operation("quantize", ["train-t2v"])
    with pytest.raises(UsageError, match="step-distill"):  # a recipe's own requirement
        check_operation("export", ["train-t2v"], needs=("step-distill",))
    with pytest.raises(UsageError, match="unknown operation"):
        check_operation("sharpen", [])


def test_writer_checks_the_order_before_work(tmp_path):
    exported = _artifact(tmp_path / "exported", "export")
    with pytest.raises(UsageError, match="prune cannot follow export"):
        ArtifactWriter(tmp_path / "out", command="prune", parent=exported)


def test_legacy_state_reads_as_a_chain_without_outputs(tmp_path):
    legacy = {"format": "neodragon-artifact/1", "parent": {"path": "p", "hash": "h"},
              "optimisations": [{"optimisation": "train-vae", "command": "train-vae", "steps": 3}], "files": {}}
    (tmp_path / "state.json").write_text(json.dumps(legacy))
    state = read_state(tmp_path)
    assert state["operations"] == [{"operation": "train-vae", "command": "train-vae", "parent": {"path": "p", "hash": "h"},
                                    "results": {"steps": 3}, "output": None}]
    assert "records no verifiable chain" in verify_artifact(tmp_path)[0]


def test_pipeline_role_swap(tmp_path):
    parent = tmp_path / "parent"
    with ArtifactWriter(parent, command="train-t2v", recipe_yaml="command: train-t2v\n") as art:
        for role in ("mmdit", "vae"):
            (art.path / role).mkdir()
            (art.path / role / "config.json").write_text(json.dumps({"role": role}))
        spec = {"format": "neodragon-pipeline/1", "sampling": {"guidance": 7.0},
                "components": {"mmdit": {"component": "mmdit/pyramid-flow", "path": "mmdit"},
                               "vae": {"component": "vae/pyramid-flow", "path": "vae"}}}
        (art.path / "pipeline.json").write_text(json.dumps(spec))
        art.log_metrics({"step": 1})
    child = tmp_path / "child"
    with ArtifactWriter(child, command="step-distill", recipe_yaml="command: step-distill\n", parent=parent) as art:
        art.copy_pipeline(parent, replace="mmdit")
        assert not (art.path / "mmdit").exists() and (art.path / "vae" / "config.json").is_file()
        assert not (art.path / "metrics.jsonl").exists()
        (art.path / "mmdit_student").mkdir()
        (art.path / "mmdit_student" / "config.json").write_text("{}")
        art.set_role("mmdit", "mmdit/pyramid-flow", "mmdit_student", sampling={"guidance": 0.0})
        with pytest.raises(ValueError, match="unknown pipeline role"):
            art.set_role("transformer", "mmdit/pyramid-flow", "mmdit_student")
    spec = json.loads((child / "pipeline.json").read_text())
    assert spec["components"]["mmdit"] == {"component": "mmdit/pyramid-flow", "path": "mmdit_student"}
    assert spec["components"]["vae"]["path"] == "vae" and spec["sampling"] == {"guidance": 0.0}
    assert applied_operations(child) == ["train-t2v", "step-distill"] and verify_artifact(child) == []
