"""`neodragon distill-te` under `torchrun --nproc_per_node 2` (gloo, CPU) ends with the weights of one
process that sees the same global batches in two accumulation steps (dropout seeds follow sample
positions, so both draw the same masks). The ranks share the teacher pass (its weights sharded with
FSDP2 when asked) and rank 0 writes the cache and the artifact."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from test_distill_te import recipe_args, tiny_parent, weights
from torchrun_cli import MARKS, assert_two_ranks_match_accumulation, run_neodragon

pytestmark = MARKS

# Adam's eps well above rounding noise: Adam moves a weight whose gradient is only noise by a whole lr.
RUN = ["train.max_steps=4", "train.eps=1e-3", "train.seed=3"]


def test_two_ranks_match_one_process_with_accumulation(tmp_path):
    parent = tiny_parent(tmp_path)
    assert_two_ranks_match_accumulation(["distill-te", *recipe_args(parent, "tdt5", *RUN)], tmp_path, weights)


def test_a_teacher_sharded_over_two_ranks_writes_the_cache_of_one_process(tmp_path):
    parent = tiny_parent(tmp_path)
    # 3 shards, the last one short, and teacher batches that do not split evenly over the ranks
    args = recipe_args(parent, "rm", "train.max_steps=1", "data.cache_shard=200", "data.teacher_batch=7")
    run_neodragon(["distill-te", *args, "-o", str(tmp_path / "one")], ranks=1)
    run_neodragon(["distill-te", *args, "data.teacher_fsdp=true", "-o", str(tmp_path / "two")])
    one = sorted((tmp_path / "one.work" / "teacher_cache").glob("shard-*.safetensors"))
    two = sorted((tmp_path / "two.work" / "teacher_cache").glob("shard-*.safetensors"))
    assert [p.name for p in one] == [p.name for p in two] and len(one) >= 2
    for a, b in zip(one, two):
        torch.testing.assert_close(load_file(b)["targets"], load_file(a)["targets"], atol=2e-3, rtol=2e-3)
