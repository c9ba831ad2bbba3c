"""Text encoders: T5 encoder, DistilT5 (T5 encoder + projection head), CLIP pooled encoders, and the
text-encoder bundle that turns prompts into the MMDiT's text conditioning.

The networks themselves are transformers' `T5EncoderModel` and `CLIPTextModelWithProjection`; this
module loads and saves them in their published local layouts (config.json + model.safetensors, or
sharded / `pytorch_model.bin` weights) with every key and shape checked before anything is copied,
and never touches a model hub.

* `T5TextEncoder` (`text/t5`): a plain T5 encoder folder (keys `shared.weight`, `encoder.block.{i}...`),
  e.g. Pyramid-Flow's / SD3's `text_encoder_3` (T5-XXL). input ids [B, L] -> [B, L, d_model].
* `DistilT5` (`text/distil-t5`): DistillT5's `T5EncoderWithProjection` layout (Neodragon's
  `text_encoder_3`): keys `encoder.shared.weight`, `encoder.encoder.block.{i}...`,
  `final_projection.{0,3}.weight`; the head Linear(d_model->out, no bias), ReLU, Dropout(0.1),
  Linear(out->out, no bias) runs on every position, padding included. -> [B, L, out_dim].
* `CLIPTextEncoder` (`text/clip`): CLIPTextModelWithProjection; input ids [B, 77] -> projected pooled
  embedding `text_embeds` [B, projection_dim].
* `TextEncoderBundle` (`text/bundle`): a root folder with `tokenizer{,_2,_3}/` and
  `text_encoder{,_2,_3}/` (the Neodragon / Pyramid-Flow SD3 layout). Returns sequence embeddings
  [B, 128, D], the T5 attention mask [B, 128] int64 (1 = real token incl. `</s>`) and pooled
  embeddings [B, P] = concat of the CLIP `text_embeds` in folder order (CLIP-L 768 + CLIP-G 1280 = 2048).

T5 tokenizers are the slow sentencepiece T5 tokenizer (`spiece.model`, legacy mode, `</s>` appended,
100 extra ids at the top of the vocabulary), as Neodragon's `tokenizer_3` is loaded.
`t5_config` / `clip_text_config` build fresh configs from sizes and `train_t5_tokenizer` trains a
sentencepiece T5 tokenizer on a text corpus, for small models trained from scratch.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from neodragon_cli.atomic import write_json
from neodragon_cli.errors import CheckpointError
from neodragon_cli.pipelines.models.base import Checkpoint, PretrainedModel
from neodragon_cli.pipelines.models.checkpoint import read_config, read_state_dict
from neodragon_cli.registry import register

if TYPE_CHECKING:
    from transformers import CLIPTextConfig, T5Config

# transformers is imported where it is used: importing it takes seconds, and the registry imports
# this module for every component lookup.

T5_MAX_LENGTH = 128
T5_EXTRA_IDS = 100

# Published sizes, for meta-device parameter counts and for building students / teachers from scratch.
T5_SIZES = {
    "flan-t5-base": dict(vocab_size=32128, d_model=768, num_layers=12, num_heads=12, d_ff=2048, d_kv=64),
    "t5-v1_1-xxl": dict(vocab_size=32128, d_model=4096, num_layers=24, num_heads=64, d_ff=10240, d_kv=64),
}
CLIP_SIZES = {
    "clip-l": dict(vocab_size=49408, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                   projection_dim=768, hidden_act="quick_gelu"),
    "clip-g": dict(vocab_size=49408, hidden_size=1280, num_layers=32, num_heads=20, intermediate_size=5120,
                   projection_dim=1280, hidden_act="gelu"),
}


# ---------------------------------------------------------------------------------------------------
# configs from sizes


def t5_config(
    *,
    vocab_size: int,
    d_model: int,
    num_layers: int,
    num_heads: int,
    d_ff: int,
    d_kv: int | None = None,
    feed_forward_proj: str = "gated-gelu",
    dropout_rate: float = 0.1,
    **extra,
) -> T5Config:
    """A T5 v1.1-style encoder config (gated-GELU FFN, untied head, 32 relative-position buckets)."""
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=num_heads,
        d_ff=d_ff,
        d_kv=d_kv or d_model // num_heads,
        feed_forward_proj=feed_forward_proj,
        dropout_rate=dropout_rate,
        tie_word_embeddings=False,
        **extra,
    )


def clip_text_config(
    *,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    projection_dim: int,
    max_position_embeddings: int = 77,
    hidden_act: str = "quick_gelu",
    bos_token_id: int = 49406,
    eos_token_id: int = 49407,
    pad_token_id: int = 1,
) -> CLIPTextConfig:
    """A CLIP text-tower config. The pooled embedding is taken at the first `eos_token_id` of each row."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        projection_dim=projection_dim,
        max_position_embeddings=max_position_embeddings,
        hidden_act=hidden_act,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


# ---------------------------------------------------------------------------------------------------
# weights in the transformers / diffusers folder layouts


def read_folder_weights(folder: str | Path, stem: str = "model") -> dict[str, torch.Tensor]:
    """The state dict stored in `folder` under the transformers (`stem="model"`) or diffusers
    (`stem="diffusion_pytorch_model"`) file names: single safetensors, a sharded safetensors index,
    the fp16 variant twin when it is the only one present, or the legacy torch `.bin`."""
    folder = Path(folder)
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    fp16 = folder / f"{stem}.fp16.safetensors"
    legacy = folder / ("pytorch_model.bin" if stem == "model" else f"{stem}.bin")
    if single.is_file():
        return read_state_dict(single)
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid shard index ({exc})") from None
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(read_state_dict(folder / shard))
        return state
    for path in (fp16, legacy):
        if path.is_file():
            return read_state_dict(path)
    raise CheckpointError(
        f"no weights in {folder}", hint=f"expected {single.name}, {index.name}, {fp16.name} or {legacy.name}"
    )


# ---------------------------------------------------------------------------------------------------
# models


class _TransformersTextModel(PretrainedModel):
    """Local-folder loading and saving shared by the transformers-backed encoders.

    The config is the transformers config (`config`, recorded as its `to_dict()`); config.json is that
    config plus `architectures` (`published_config`), and a subclass names its transformers config
    class and the submodule whose state dict is the published weight file (`published_module`).
    Weights may be single, sharded, fp16-only or legacy `.bin`.
    Text encoders stay in float when quantizing (DistilT5 runs FP16 on the phone, deploy notes).
    """

    weights_names = ("model.safetensors",)
    keep_precision = ("*",)

    @classmethod
    def read_checkpoint(cls, path: Path) -> Checkpoint:
        return Checkpoint(read_config(path), read_folder_weights(path), str(path))

    @classmethod
    def config_from_published(cls, config: dict) -> dict:
        fields = {k: v for k, v in config.items() if k != "architectures"}
        return {"config": cls.transformers_config_class()(**fields)}

    @staticmethod
    def transformers_config_class() -> type:
        raise NotImplementedError

    def _example_ids(self, batch: int, vocab_size: int) -> torch.Tensor:
        """[batch, 8] int64 token ids drawn from the vocabulary."""
        return torch.randint(0, vocab_size, (batch, 8), device=self._example_factory()["device"])


def _config_json(path: Path) -> dict | None:
    config = path / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text())
    except json.JSONDecodeError:
        return None


def _is_projected_t5(config: dict) -> bool:
    projection_keys = ("project_in_dim", "project_out_dim", "out_dim")
    return "T5EncoderWithProjection" in (config.get("architectures") or []) or any(k in config for k in projection_keys)


def _looks_like_t5(path: Path) -> bool:
    config = _config_json(path)
    return config is not None and config.get("model_type") == "t5" and not _is_projected_t5(config)


def _looks_like_distil_t5(path: Path) -> bool:
    config = _config_json(path)
    return config is not None and config.get("model_type") == "t5" and _is_projected_t5(config)


def _looks_like_clip(path: Path) -> bool:
    config = _config_json(path)
    return config is not None and config.get("model_type") in ("clip_text_model", "clip")


@register("text", "t5", description="T5 encoder (transformers T5EncoderModel folder, e.g. T5-XXL)", detect=_looks_like_t5)
class T5TextEncoder(_TransformersTextModel):
    """T5 encoder stack. forward(input_ids [B, L] int64, attention_mask [B, L] (1 = token, 0 = pad))
    -> last hidden state [B, L, d_model] (after the final RMS layer norm), float."""

    repeated_blocks = ("encoder.encoder.block",)

    def __init__(self, config: T5Config | dict):
        from transformers import T5Config, T5EncoderModel

        super().__init__()
        config = config if isinstance(config, T5Config) else T5Config(**config)
        self.encoder = T5EncoderModel(config)
        self.config["config"] = self.encoder.config.to_dict()  # as adjusted for an encoder (no cache, not enc-dec)

    @staticmethod
    def transformers_config_class() -> type:
        from transformers import T5Config

        return T5Config

    @property
    def output_dim(self) -> int:
        return self.encoder.config.d_model

    def published_module(self) -> nn.Module:
        return self.encoder

    def published_config(self) -> dict:
        return {**self.encoder.config.to_dict(), "architectures": ["T5EncoderModel"]}

    def example_inputs(self, batch: int = 1) -> dict:
        """input_ids [batch, 8] int64, attention_mask [batch, 8] with the last token padded."""
        ids = self._example_ids(batch, self.encoder.config.vocab_size)
        mask = torch.ones_like(ids)
        mask[:, -1] = 0
        return {"input_ids": ids, "attention_mask": mask}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@register(
    "text",
    "distil-t5",
    description="DistilT5: T5 encoder + projection head (T5EncoderWithProjection layout, Neodragon text_encoder_3)",
    detect=_looks_like_distil_t5,
)
class DistilT5(T5TextEncoder):
    """T5 encoder + `final_projection` to the teacher's text width. forward -> [B, L, project_out_dim];
    padded positions are projected like the others (not zeroed), as in the published model."""

    def __init__(self, config: T5Config | dict, project_out_dim: int = 4096):
        super().__init__(config)
        d_model = self.encoder.config.d_model
        self.project_out_dim = project_out_dim
        self.final_projection = nn.Sequential(
            nn.Linear(d_model, project_out_dim, bias=False),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(project_out_dim, project_out_dim, bias=False),
        )

    @classmethod
    def config_from_published(cls, config: dict) -> dict:
        config = dict(config)
        # The published config class reads the head width from `out_dim` (default 4096) and ignores
        # `project_out_dim`; DistillT5's own config.json only has `project_out_dim`. Honour both.
        out_dim = config.pop("out_dim", None)
        project_out = config.pop("project_out_dim", None)
        project_in = config.pop("project_in_dim", None)
        if project_in is not None and project_in != config.get("d_model"):
            raise CheckpointError(f"DistilT5 config: project_in_dim {project_in} differs from d_model {config.get('d_model')}")
        return {**super().config_from_published(config), "project_out_dim": int(out_dim or project_out or 4096)}

    @property
    def output_dim(self) -> int:
        return self.project_out_dim

    def published_module(self) -> nn.Module:
        return self

    def published_config(self) -> dict:
        width = self.project_out_dim
        return {
            **self.encoder.config.to_dict(),
            "architectures": ["T5EncoderWithProjection"],
            "project_in_dim": self.encoder.config.d_model,
            "project_out_dim": width,
            "out_dim": width,
        }

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.final_projection(super().forward(input_ids, attention_mask))


@register("text", "clip", description="CLIP text encoder with projection (pooled text_embeds)", detect=_looks_like_clip)
class CLIPTextEncoder(_TransformersTextModel):
    """CLIP text tower + projection. forward(input_ids [B, L] int64) -> text_embeds [B, projection_dim]:
    the final-layer-normed hidden state at each row's first end-of-text token, projected. Causal
    attention, no padding mask (as the bundle calls it)."""

    repeated_blocks = ("model.text_model.encoder.layers",)

    def __init__(self, config: CLIPTextConfig | dict):
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        super().__init__()
        config = config if isinstance(config, CLIPTextConfig) else CLIPTextConfig(**config)
        self.model = CLIPTextModelWithProjection(config)

    @staticmethod
    def transformers_config_class() -> type:
        from transformers import CLIPTextConfig

        return CLIPTextConfig

    @property
    def output_dim(self) -> int:
        return self.model.config.projection_dim

    @property
    def max_positions(self) -> int:
        return self.model.config.max_position_embeddings

    def published_module(self) -> nn.Module:
        return self.model

    def published_config(self) -> dict:
        return {**self.model.config.to_dict(), "architectures": ["CLIPTextModelWithProjection"]}

    def example_inputs(self, batch: int = 1) -> dict:
        """input_ids [batch, 8] int64 ending with the end-of-text token (where the pooled output is read)."""
        ids = self._example_ids(batch, self.model.config.vocab_size)
        ids[:, -1] = self.model.config.eos_token_id
        return {"input_ids": ids}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).text_embeds


# ---------------------------------------------------------------------------------------------------
# tokenizers


@functools.cache
def t5_tokenizer_class() -> type:
    """`T5SentencePieceTokenizer`, the slow T5 tokenizer: sentencepiece in legacy mode, `</s>` appended,
    pad 0 / eos 1 / unk 2, and `extra_ids` sentinel tokens `<extra_id_0..n-1>` at the top of the
    vocabulary (`<extra_id_0>` last). Reads and writes `spiece.model` + tokenizer_config.json (a
    published `tokenizer_3/`). Defined on first use, as it subclasses a transformers class."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    class T5SentencePieceTokenizer(SentencePieceBackend):
        vocab_files_names = {"vocab_file": "spiece.model"}

        def __init__(self, vocab_file: str, extra_ids: int = T5_EXTRA_IDS, **kwargs):
            for key, value in (("eos_token", "</s>"), ("unk_token", "<unk>"), ("pad_token", "<pad>")):
                kwargs.setdefault(key, value)
            # Always the legacy sentencepiece path (as the published tokenizer_3 is saved): the other one
            # needs a protobuf runtime matching sentencepiece's and differs only right after special tokens.
            kwargs["legacy"] = True
            kwargs.setdefault("special_tokens_pattern", "eos")
            kwargs.setdefault("model_max_length", T5_MAX_LENGTH)
            super().__init__(vocab_file=vocab_file, extra_ids=extra_ids, **kwargs)
            sentinels = [f"<extra_id_{i}>" for i in reversed(range(extra_ids))]
            missing = [token for token in sentinels if token not in self.get_vocab()]
            if missing:
                self.add_tokens(missing, special_tokens=True)

        def save_pretrained(self, save_directory, **kwargs):
            files = super().save_pretrained(save_directory, **kwargs)
            # Record the published class name so that transformers' T5Tokenizer / AutoTokenizer read the folder.
            config_path = Path(save_directory) / "tokenizer_config.json"
            write_json(config_path, {**json.loads(config_path.read_text()), "tokenizer_class": "T5Tokenizer"})
            return files

    return T5SentencePieceTokenizer


def load_tokenizer(folder: str | Path):
    """A tokenizer from a local folder: `spiece.model` -> the slow T5 tokenizer; otherwise a CLIP BPE
    tokenizer (vocab.json + merges.txt, or tokenizer.json)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"tokenizer folder does not exist: {folder}")
    if (folder / "spiece.model").is_file():
        spiece = str(folder / "spiece.model")
        return t5_tokenizer_class().from_pretrained(str(folder), vocab_file=spiece, local_files_only=True)
    if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    raise CheckpointError(f"no tokenizer files in {folder}", hint="expected spiece.model (T5) or vocab.json + merges.txt (CLIP)")


def train_t5_tokenizer(
    texts: Sequence[str], folder: str | Path, vocab_size: int, *, extra_ids: int = T5_EXTRA_IDS,
    model_max_length: int = T5_MAX_LENGTH, **sentencepiece_options,
):
    """Train a unigram sentencepiece model on `texts` with T5's special ids (pad 0, eos 1, unk 2, no
    bos), save it as a T5 tokenizer folder and return the tokenizer. Deterministic for fixed input.
    `sentencepiece_options` go to the trainer (e.g. normalization_rule_name="nmt_nfkc_cf")."""
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=str(folder / "spiece"),
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        hard_vocab_limit=False,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
        **sentencepiece_options,
    )
    (folder / "spiece.vocab").unlink(missing_ok=True)
    tokenizer = t5_tokenizer_class()(vocab_file=str(folder / "spiece.model"), extra_ids=extra_ids,
                                     model_max_length=model_max_length)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


# ---------------------------------------------------------------------------------------------------
# bundle


def _looks_like_bundle(path: Path) -> bool:
    return path.is_dir() and (path / "text_encoder_3" / "config.json").is_file() and (path / "tokenizer_3").is_dir()


def _load_t5_side(folder: Path, dtype: torch.dtype | str | None) -> T5TextEncoder:
    if not _looks_like_t5(folder) and not _looks_like_distil_t5(folder):
        raise CheckpointError(f"{folder} is not a T5 encoder folder (config.json model_type must be 't5')")
    return (DistilT5 if _looks_like_distil_t5(folder) else T5TextEncoder).from_pretrained(folder, dtype)


_CLIP_FOLDERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))


@register(
    "text",
    "bundle",
    description="Prompt -> (T5/DistilT5 sequence embeds, mask, concatenated CLIP pooled) from a Neodragon/SD3 root",
    detect=_looks_like_bundle,
)
class TextEncoderBundle(nn.Module):
    """Prompts -> (embeds [B, max_length, D] float, mask [B, max_length] int64, pooled [B, P] float).

    The T5 side (`t5_tokenizer`, `t5_encoder`: T5TextEncoder or DistilT5) pads/truncates to
    `max_length` (128) with `</s>` appended and gets the attention mask; its output keeps the values at
    padded positions. Each CLIP side tokenizes to the first CLIP tokenizer's `model_max_length` (77),
    without a mask, and the pooled outputs are concatenated in order (CLIP-L then CLIP-G). With no CLIP
    side, pooled is [B, 0].
    """

    def __init__(
        self,
        t5_tokenizer,
        t5_encoder: T5TextEncoder,
        clip_tokenizers: Sequence = (),
        clip_encoders: Sequence[CLIPTextEncoder] = (),
        max_length: int = T5_MAX_LENGTH,
    ):
        super().__init__()
        if len(clip_tokenizers) != len(clip_encoders):
            raise ValueError("one tokenizer per CLIP encoder")
        self.t5_tokenizer = t5_tokenizer
        self.t5_encoder = t5_encoder
        self.clip_tokenizers = list(clip_tokenizers)
        self.clip_encoders = nn.ModuleList(clip_encoders)
        self.max_length = max_length

    @property
    def sequence_dim(self) -> int:
        return self.t5_encoder.output_dim

    @property
    def pooled_dim(self) -> int:
        return sum(e.output_dim for e in self.clip_encoders)

    def _device(self) -> torch.device:
        return next(self.t5_encoder.parameters()).device

    def tokenize_t5(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 input ids and attention mask, both [B, max_length] int64."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        enc = self.t5_tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True, add_special_tokens=True, return_tensors="pt"
        )
        return enc.input_ids, enc.attention_mask.long()

    def pooled(self, prompts: str | Sequence[str]) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not self.clip_encoders:
            return torch.zeros(len(prompts), 0, device=self._device())
        # The published bundle uses the first tokenizer's length for every CLIP side.
        length = min(self.clip_tokenizers[0].model_max_length, self.clip_encoders[0].max_positions)
        outputs = []
        for tokenizer, encoder in zip(self.clip_tokenizers, self.clip_encoders):
            ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
            outputs.append(encoder(ids.to(self._device())))
        return torch.cat(outputs, dim=-1)

    def forward(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize_t5(prompts)
        device = self._device()
        ids, mask = ids.to(device), mask.to(device)
        embeds = self.t5_encoder(ids, attention_mask=mask)
        dtype = next(self.t5_encoder.parameters()).dtype  # the encoder's dtype even under autocast, as published
        return embeds.to(dtype), mask, self.pooled(prompts)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype | str | None = None, *, max_length: int = T5_MAX_LENGTH
    ) -> "TextEncoderBundle":
        """Load `tokenizer_3/` + `text_encoder_3/` (T5 or DistilT5) and the CLIP pairs present
        (`tokenizer/` + `text_encoder/`, `tokenizer_2/` + `text_encoder_2/`), each encoder in `dtype`.
        A composite of tokenizers and encoders, not a PretrainedModel: each encoder is one."""
        root = Path(path)
        if not _looks_like_bundle(root):
            raise CheckpointError(
                f"{root} has no text_encoder_3/ + tokenizer_3/", hint="point at a Neodragon or Pyramid-Flow (SD3) root folder"
            )
        clip_tokenizers, clip_encoders = [], []
        for tok_name, enc_name in _CLIP_FOLDERS:
            if (root / enc_name).is_dir():
                clip_tokenizers.append(load_tokenizer(root / tok_name))
                clip_encoders.append(CLIPTextEncoder.from_pretrained(root / enc_name, dtype))
        t5_tokenizer, t5_encoder = load_tokenizer(root / "tokenizer_3"), _load_t5_side(root / "text_encoder_3", dtype)
        return cls(t5_tokenizer, t5_encoder, clip_tokenizers, clip_encoders, max_length).eval()

    def save_pretrained(self, path: str | Path) -> None:
        root = Path(path)
        self.t5_tokenizer.save_pretrained(str(root / "tokenizer_3"))
        self.t5_encoder.save_pretrained(root / "text_encoder_3")
        for (tok_name, enc_name), tokenizer, encoder in zip(_CLIP_FOLDERS, self.clip_tokenizers, self.clip_encoders):
            tokenizer.save_pretrained(str(root / tok_name))
            encoder.save_pretrained(root / enc_name)
