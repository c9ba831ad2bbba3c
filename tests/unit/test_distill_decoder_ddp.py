"""`neodragon distill-decoder` under `torchrun --nproc_per_node 2` (gloo, CPU) ends with the weights of
one process that sees the same global batches in two accumulation steps; rank 0 alone writes the
latent cache and the artifact."""

from __future__ import annotations

from test_distill_decoder import TINY, tensors
from torchrun_cli import MARKS, assert_two_ranks_match_accumulation

pytestmark = MARKS

# Adam's eps well above rounding noise: Adam moves a weight whose gradient is only noise by a whole lr.
RUN = ["train.max_steps=3", "train.eps=1e-3", "train.seed=3"]


def test_two_ranks_match_one_process_with_accumulation(tmp_path):
    assert_two_ranks_match_accumulation(["distill-decoder", "shapes/distill_decoder", *TINY, *RUN], tmp_path,
                                        lambda out: tensors(out / "vae" / "diffusion_pytorch_model.safetensors"))
