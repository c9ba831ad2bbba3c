"""`neodragon distill-te` under `torchrun --nproc_per_node 2` (gloo, CPU) ends with the weights of one
process that sees the same global batches in two accumulation steps (dropout seeds follow sample
positions, so both draw the same masks); rank 0 alone writes the teacher cache and the artifact."""

from __future__ import annotations

from test_distill_te import recipe_args, tiny_parent, weights
from torchrun_cli import MARKS, assert_two_ranks_match_accumulation

pytestmark = MARKS

# Adam's eps well above rounding noise: Adam moves a weight whose gradient is only noise by a whole lr.
RUN = ["train.max_steps=4", "train.eps=1e-3", "train.seed=3"]


def test_two_ranks_match_one_process_with_accumulation(tmp_path):
    parent = tiny_parent(tmp_path)
    assert_two_ranks_match_accumulation(["distill-te", *recipe_args(parent, "tdt5", *RUN)], tmp_path, weights)
