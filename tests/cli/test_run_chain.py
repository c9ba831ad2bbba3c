"""`neodragon run CHAIN`: every step's command, recipe and options and the order of operations are
checked before anything runs; a bad chain exits 2 with one line and writes nothing. (The chain
running, caching and resuming: tests/unit/test_chain.py.)"""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from neodragon_cli.app import app

runner = CliRunner()
TE = {"command": "distill-te", "recipe": "shapes/distill_te"}
PRUNE = {"command": "prune", "recipe": "shapes/prune"}


def chain_file(tmp_path, steps: dict, **top) -> str:
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump({"command": "chain", "model": "shapes-teacher", **top, "steps": steps}, sort_keys=False))
    return str(path)


def run(*args: str):
    return runner.invoke(app, ["run", *args])


def one_line_exit_2(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize("steps, extra, message", [
    ({"te": TE, "x": {"command": "distill-tee"}}, [], "cannot run step x (distill-tee): chain steps can be distill-te,"),
    ({"te": {**TE, "overrides": {"train.max_stepz": 3}}}, [], "unknown key 'train.max_stepz'"),
    ({"te": {**TE, "overrides": {"mode": "rmm"}}}, [], "expected one of"),
    ({"te": {**TE, "recipe": "shapes/nope"}}, [], "recipe 'shapes/nope' is neither a file nor a shipped recipe"),
    ({"te": {"command": "distill-te"}}, [], "distill-te needs a recipe"),
    ({"te": {**TE, "overrides": {"parent": "elsewhere"}}}, [], "the chain sets each step's parent"),
    ({"te": {**TE, "recipe": "shapes/prune"}}, [], "recipe is for command 'prune', not 'distill-te'"),
    ({"export": {"command": "export", "options": {"opsett": 18}}}, [], "unknown key 'steps.export.options.opsett'"),
    ({"export": {"command": "export", "options": {"height": 64}}}, [], "give all of height, width and frames"),
    ({"export": {"command": "export", "recipe": "shapes/prune"}}, [], "export takes no recipe"),
    ({"ev": {"command": "eval", "options": {"num_samples": 0}}}, [], "num_samples must be at least 1"),
    ({"ev": {"command": "eval", "options": {"seeds": [0, 1]}}}, [], "unknown key 'steps.ev.options.seeds'"),
    ({"a": {"command": "eval", "options": {"reference": "b"}}, "b": {"command": "eval"}}, [], "step 'b' is not an eval step before a"),
    ({"te": TE, "ev": {"command": "eval", "options": {"reference": "te"}}}, [], "step 'te' is not an eval step before ev"),
    ({"ev": {"command": "eval", "options": {"reference": "nowhere"}}}, [], "'nowhere' is neither an eval step of the chain nor a folder"),
    ({"a": {"command": "eval", "options": {"num_samples": 1}}, "b": {"command": "eval", "options": {"num_samples": 2, "reference": "a"}}},
     [], "eval step 'a' does not make every video of b"),
    ({"a": {"command": "eval", "options": {"seed": 1}}, "b": {"command": "eval", "options": {"reference": "a"}}},
     [], "eval step 'a' does not make every video of b"),
    ({"te": TE}, ["--report", "--until", "te"], "--report runs nothing"),
    ({"p": {"command": "profile", "options": {"runs": 0}}}, [], "runs must be at least 1"),
    ({"q": {"command": "quantize", "options": {"scheme": "w4a16"}}}, [], "unknown scheme 'w4a16'"),
    ({"q": {"command": "quantize"}}, [], "quantize needs a parent that went through export"),
    ({"p": {"command": "profile", "options": {"runtime": "aihub"}}}, [], "expected one of"),
    ({"te": TE}, ["steps.tee.train.max_steps=1"], "the chain has no step 'tee'"),
    ({"te": TE}, ["steps.te.train.max_steps=abc"], "train.max_steps: expected int"),
    ({"te": TE}, ["--from", "prune"], "--from prune: the chain has no such step"),
    ({"te": TE, "prune": PRUNE}, ["--from", "prune", "--until", "te"], "--from prune comes after --until te"),
    ({"export": {"command": "export"}, "prune": PRUNE}, [], "step prune: prune cannot follow export"),
    ({"te": TE}, ["model=no/such/folder"], "model path does not exist"),
    ({"te": TE}, ["model="], "the chain's model is not set"),
])  # fmt: skip
def test_a_bad_chain_exits_2_with_one_line_and_writes_nothing(tmp_path, steps, extra, message):
    chain = chain_file(tmp_path, steps)
    out = tmp_path / "out"
    one_line_exit_2(run(chain, "-o", str(out), *extra), message)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain.yaml"]


def test_every_problem_of_a_chain_is_listed(tmp_path):
    chain = chain_file(tmp_path, {"te": {**TE, "overrides": {"train.max_stepz": 3}}, "x": {"command": "nope"},
                                  "export": {"command": "export", "options": {"opsett": 1}}})
    result = run(chain, "-o", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "3 problems" in result.output and "nope" in result.output and "max_stepz" in result.output and "opsett" in result.output
    assert not (tmp_path / "out").exists()


def test_shipped_chains_validate_as_recipes_and_name_the_commands_not_there_yet(tmp_path):
    from neodragon_cli.pipelines.chain import STEP_KINDS

    result = runner.invoke(app, ["recipes", "validate", "shapes/neodragon_chain", "neodragon/neodragon_chain"])
    assert result.exit_code == 0, result.output
    missing = [c for c in ("distill-te", "distill-decoder", "prune", "step-distill", "export", "quantize", "profile", "eval")
               if c not in STEP_KINDS]  # fmt: skip
    for chain in ("shapes/neodragon_chain", "neodragon/neodragon_chain"):
        result = run(chain, "-o", str(tmp_path / "out"), "--list")
        if missing:
            one_line_exit_2(result, f"cannot run step{'s' * (len(missing) > 1)} {', '.join(missing)}:")
        elif chain == "neodragon/neodragon_chain":  # the real-scale chain stops at its first missing input
            one_line_exit_2(result, "the chain's model is not set")
        else:
            assert result.exit_code == 0, result.output
        assert not (tmp_path / "out").exists()


def test_list_shows_the_plan_and_writes_nothing(tmp_path):
    chain = chain_file(tmp_path, {"te": TE, "prune": PRUNE, "eval": {"command": "eval"}})
    out = tmp_path / "out"
    result = run(chain, "-o", str(out), "--list")
    assert result.exit_code == 0, result.output
    for word in ("te", "distill-te", "prune", "eval", "pending"):
        assert word in result.output
    assert not out.exists()


def test_an_output_folder_that_is_not_a_chain_is_refused(tmp_path):
    chain = chain_file(tmp_path, {"te": TE})
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    one_line_exit_2(run(chain, "-o", str(out)), "holds no run.json")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_step_overrides_reach_the_step_recipe(tmp_path):
    from neodragon_cli.pipelines.chain import load_plan

    chain = chain_file(tmp_path, {"te": {**TE, "overrides": {"train": {"max_steps": 7}, "mode": "em"}}})
    plan = load_plan(chain, ["steps.te.train.lr=0.5"])
    recipe = plan.steps[0].config
    assert (recipe.mode, recipe.train.max_steps, recipe.train.lr) == ("em", 7, 0.5)
    assert plan.steps[0].config_text.count("<the previous step's artifact>") == 1  # the key leaves the parent's path out


def test_several_eval_steps_plan_and_a_reference_enters_the_key(tmp_path):
    from neodragon_cli.pipelines.chain import load_plan

    chain = chain_file(tmp_path, {"eval-teacher": {"command": "eval", "options": {"num_samples": 2}}, "te": TE,
                                  "eval-te": {"command": "eval", "options": {"reference": "eval-teacher"}}, "prune": PRUNE,
                                  "eval-prune": {"command": "eval", "options": {"num_samples": 2, "reference": "eval-teacher"}}})
    plan = load_plan(chain)
    assert [(s.name, s.kind.command) for s in plan.steps] == [("eval-teacher", "eval"), ("te", "distill-te"), ("eval-te", "eval"),
                                                               ("prune", "prune"), ("eval-prune", "eval")]
    changed = load_plan(chain, ["steps.eval-teacher.sampling.guidance=1.5"])
    assert [a.config_text != b.config_text for a, b in zip(plan.steps, changed.steps)] == [True, False, True, False, True]


def test_report_needs_a_chain_folder_and_writes_nothing_else(tmp_path):
    chain = chain_file(tmp_path, {"te": TE})
    out = tmp_path / "out"
    one_line_exit_2(run(chain, "-o", str(out), "--report"), "holds no run.json: the chain has not run there")
    assert not out.exists()


def test_the_shipped_chains_evals_make_the_readmes_held_out_videos(tmp_path):
    """Every eval of shapes/neodragon_chain makes the videos of `generate --prompts-file heldout.txt
    --num-samples 2 --seed 0`, heldout.txt being what `shapes prompts -n 100 --split heldout --seed 1` writes."""
    from neodragon_cli.pipelines.chain import eval_videos, load_plan
    from neodragon_cli.pipelines.flow.pipeline import sample_seed

    heldout = tmp_path / "heldout.txt"
    result = runner.invoke(app, ["shapes", "prompts", str(heldout), "-n", "100", "--split", "heldout", "--seed", "1"])
    assert result.exit_code == 0, result.output
    prompts = heldout.read_text().splitlines()
    plan = load_plan("shapes/neodragon_chain")
    evals = [s for s in plan.steps if s.kind.command == "eval"]
    assert [s.name for s in evals] == ["eval-teacher", "eval-te", "eval-decoder", "eval-prune", "eval-step-distill", "eval"]
    assert plan.steps[0].name == "eval-teacher" and plan.steps[-1].name == "eval"
    expected = [(p, k, sample_seed(0, p, k)) for p in prompts for k in range(2)]
    for step in evals:
        assert [(v.prompt, v.sample, v.seed) for v in eval_videos(step.config, plan.source.parent)] == expected
        assert step.config.reference == ("" if step.name == "eval-teacher" else "eval-teacher")
