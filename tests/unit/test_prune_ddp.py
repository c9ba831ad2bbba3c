"""`neodragon prune` under `torchrun --nproc_per_node 2` (gloo, CPU) ends with the weights of one
process that sees the same global batches in two accumulation steps, through both stages; rank 0
alone encodes the latent cache and writes the artifact."""

from __future__ import annotations

from test_prune import TINY, tiny_pipeline, weights
from torchrun_cli import MARKS, assert_two_ranks_match_accumulation

pytestmark = MARKS

# batch 8: each micro-batch holds one sample per pyramid column (sum of flow.sample_ratios = 4). Adam's eps
# well above rounding noise: Adam moves a weight whose gradient is only noise by a whole lr.
RUN = ["blocks.policy=explicit", "blocks.explicit=[0,2]", "train.batch_size=8", "train.eps=1e-3", "train.seed=3"]


def test_two_ranks_match_one_process_with_accumulation(tmp_path):
    parent = tiny_pipeline(tmp_path)
    assert_two_ranks_match_accumulation(["prune", "shapes/prune", f"parent={parent}", *TINY, *RUN], tmp_path, weights)
