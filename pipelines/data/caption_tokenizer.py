"""A small SentencePiece tokenizer for Shapes-world captions, saved as a T5 tokenizer folder.

The Shapes teacher's text encoder is a small T5; its tokenizer is a unigram SentencePiece model
trained on the caption grammar's prompt corpus with T5's special-token layout (pad 0, eos 1, unk 2,
no bos; see `text_encoders.train_t5_tokenizer`). Text is NFKC-normalised and lowercased (rule
`nmt_nfkc_cf`), so "A Red Ball" and "a red ball" encode the same. The grammar's small vocabulary
supports about 100 pieces, so `vocab_size` is an upper bound. Training is deterministic.
"""

from __future__ import annotations

from pathlib import Path

from neodragon_cli.errors import UsageError
from neodragon_cli.pipelines.data.shapes import prompt_corpus
from neodragon_cli.pipelines.models.text_encoders import load_tokenizer, train_t5_tokenizer


def train_caption_tokenizer(out_dir: str | Path, vocab_size: int = 256, corpus_size: int = 20_000, seed: int = 0,
                            model_max_length: int = 64):
    """Train on `corpus_size` train-split captions; write the T5 tokenizer folder `out_dir`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UsageError(f"{out_dir} exists and is not empty", hint="choose a new folder for the tokenizer")
    corpus = prompt_corpus(corpus_size, seed=seed, split="train")
    train_t5_tokenizer(corpus, out_dir, vocab_size, extra_ids=0, model_max_length=model_max_length,
                       normalization_rule_name="nmt_nfkc_cf", character_coverage=1.0)
    return out_dir


def load_caption_tokenizer(path: str | Path):
    """The tokenizer folder as the slow (SentencePiece-exact) T5 tokenizer."""
    return load_tokenizer(path)
