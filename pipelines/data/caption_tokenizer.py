"""A small SentencePiece tokenizer for Shapes-world captions, saved as a T5 tokenizer folder.

The Shapes teacher's text encoder is a small T5; its tokenizer is a unigram SentencePiece model
trained on the caption grammar's prompt corpus, with T5's special-token layout (pad = 0, eos = 1,
unk = 2, no bos, `extra_ids` sentinels appended at the end of the vocabulary) so that transformers'
`T5Tokenizer` loads the folder like any T5 checkpoint's tokenizer:

    OUT/spiece.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json

`tokenizer.json` is the same model in the `tokenizers` format, written here from the SentencePiece
pieces and scores, so loading never needs transformers' spiece → tokenizers conversion (which needs
a protobuf runtime matching sentencepiece's generated code). Text is NFKC-normalised and lowercased
(SentencePiece rule `nmt_nfkc_cf`), so "A Red Ball" and "a red ball" encode the same; as in T5,
characters never seen in the corpus (digits, punctuation) become `<unk>`. The grammar's small
vocabulary supports about 100 pieces (SentencePiece refuses more), so `vocab_size` is an upper bound.
Training is deterministic (fixed corpus order, one thread).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from neodragon_cli.errors import NeodragonError, UsageError
from neodragon_cli.pipelines.data.shapes import prompt_corpus

SPIECE = "spiece.model"


def train_caption_tokenizer(
    out_dir: str | Path,
    vocab_size: int = 256,
    corpus_size: int = 20_000,
    seed: int = 0,
    extra_ids: int = 0,
    model_max_length: int = 64,
) -> Path:
    """Train on `corpus_size` train-split captions and write a T5 tokenizer folder to `out_dir`
    (written under a temporary name, then renamed). Returns `out_dir`."""
    import sentencepiece as spm

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UsageError(f"{out_dir} exists and is not empty", hint="choose a new folder for the tokenizer")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700 folders
    try:
        corpus = prompt_corpus(corpus_size, seed=seed, split="train")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(corpus),
                model_prefix=str(tmp / "spiece"),
                model_type="unigram",
                vocab_size=vocab_size,
                hard_vocab_limit=False,  # the grammar's vocabulary is small; take what it supports
                character_coverage=1.0,
                normalization_rule_name="nmt_nfkc_cf",
                pad_id=0,
                eos_id=1,
                unk_id=2,
                bos_id=-1,
                pad_piece="<pad>",
                eos_piece="</s>",
                unk_piece="<unk>",
                num_threads=1,
                shuffle_input_sentence=False,
                minloglevel=2,
            )
        except RuntimeError as exc:
            raise NeodragonError(f"sentencepiece training failed: {exc}") from exc
        (tmp / "spiece.vocab").unlink(missing_ok=True)
        _fast_tokenizer(tmp / SPIECE).save(str(tmp / "tokenizer.json"))
        specials = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
        sentinels = [f"<extra_id_{i}>" for i in range(extra_ids)]
        config = {
            "tokenizer_class": "T5Tokenizer",
            **specials,
            "extra_ids": extra_ids,
            "additional_special_tokens": sentinels,
            "model_max_length": model_max_length,
            "legacy": False,
        }
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "special_tokens_map.json").write_text(json.dumps({**specials, "additional_special_tokens": sentinels}, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _proto_field(message: bytes, number: int) -> bytes | None:
    """The first length-delimited field `number` of a serialized protobuf message (wire format read by
    hand, so no protobuf runtime is involved)."""

    def varint(pos: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = message[pos]
            value |= (byte & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if byte < 0x80:
                return value, pos

    pos = 0
    while pos < len(message):
        key, pos = varint(pos)
        wire = key & 7
        if wire == 0:
            _, pos = varint(pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = varint(pos)
            if key >> 3 == number:
                return message[pos : pos + length]
            pos += length
        else:
            raise NeodragonError(f"unexpected protobuf wire type {wire} in a SentencePiece model")
    return None


def _fast_tokenizer(spiece: Path):
    """The SentencePiece model as the `tokenizers.Tokenizer` transformers' T5Tokenizer builds from
    it: unigram pieces and scores, SentencePiece's precompiled normalizer, metaspace word boundaries
    ("▁"), `</s>` appended to every sequence."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    sp = spm.SentencePieceProcessor(model_file=str(spiece))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tokenizer = Tokenizer(Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=False))
    # ModelProto field 3 = NormalizerSpec, whose field 2 = precompiled_charsmap (NFKC + case folding).
    charsmap = _proto_field(_proto_field(spiece.read_bytes(), 3) or b"", 2)
    if charsmap:
        tokenizer.normalizer = normalizers.Precompiled(charsmap)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", sp.eos_id())]
    )
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<pad>", "</s>", "<unk>")])
    return tokenizer


def load_caption_tokenizer(path: str | Path):
    """The tokenizer folder as transformers' T5Tokenizer (slow, SentencePiece-exact)."""
    from transformers import T5Tokenizer

    path = Path(path)
    if not (path / SPIECE).is_file():
        raise UsageError(f"{path} holds no {SPIECE}", hint="train one with train_caption_tokenizer()")
    return T5Tokenizer.from_pretrained(str(path))
