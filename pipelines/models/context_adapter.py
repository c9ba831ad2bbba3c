"""ContextAdapter: Neodragon's skip-MLP from the (distilled) text encoder's width to the MMDiT's.

`ContextAdapter` is the published `SkipMLP` (config.json + diffusion_pytorch_model.safetensors):

    network_layers.0 = Sequential(Identity, Linear(input_dims -> d0), act)
    network_layers.i = Sequential(Identity, Linear(input_dims + d_{i-1} -> d_i), act)      i = 1..n-1
    network_layers.n = Sequential(Linear(input_dims + d_{n-1} -> output_dims), out_act)
    forward: y = L0(x); y = L_j(cat([x, y], -1)) for j = 1..n   (input first; without skip: L_j(y))

It is DenseNet-style input concatenation, not additive residuals, and has no normalisation layer.
Input [..., input_dims] (DistilT5 embeddings, padding positions included) -> [..., output_dims]
(the MMDiT's `encoder_hidden_states`). Defaults are the published real size: 4096 -> 1536 through
four 4096-wide layers, 130,041,344 parameters.

Text-encoder distillation trains a student text path in one of these modes (`StudentTextPath`):

* RM (replace mode): student (frozen) -> ContextAdapter to the MMDiT width; the adapter replaces the
  teacher's context embedder. This is the published inference layout.
* EM (extend mode): student (frozen) -> ContextAdapter to the teacher text width -> the teacher's
  frozen context embedder (`ExtendedContextAdapter`); foldable into an RM adapter afterwards.
* LORA: low-rank adapters on the student's linear layers (`add_lora`), base weights frozen.
* TDT5: the whole student trained.

LORA and TDT5 either keep an RM ContextAdapter or, as in the paper's Table 2 (DistilT5 + the
context embedder, no MLP adapter), feed the student's output to the teacher's frozen context embedder.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from neodragon_cli.errors import UsageError
from neodragon_cli.pipelines.models.base import PretrainedModel
from neodragon_cli.pipelines.models.checkpoint import load_state_dict_checked
from neodragon_cli.registry import register

ACTIVATIONS = {
    "gelu": nn.GELU,  # exact erf GELU, as published
    "gelu_tanh": partial(nn.GELU, approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "linear": nn.Identity,
}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{name}' (known: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]()


def _looks_like_context_adapter(path: Path) -> bool:
    config = path / "config.json"
    if not path.is_dir() or not config.is_file():
        return False
    text = config.read_text()
    named = any(f'"{name}"' in text for name in ("ContextAdapter", "SkipMLP"))
    return named or ('"layer_depths"' in text and '"skips"' in text)


@register(
    "adapter",
    "context-adapter",
    description="Neodragon ContextAdapter (SkipMLP, text width -> MMDiT width)",
    detect=_looks_like_context_adapter,
)
class ContextAdapter(PretrainedModel):
    """Skip MLP [..., input_dims] -> [..., output_dims] (see the module docstring for the layout)."""

    published_class_name = "ContextAdapter"
    repeated_blocks = ()  # each layer has its own input width
    keep_precision = ("*",)  # a small norm-free MLP: 2.6 dB SQNR at W8A16 against 39.4 dB in FP16 (deploy notes)

    def __init__(
        self,
        input_dims: int = 4096,
        output_dims: int = 1536,
        layer_depths: Sequence[int] = (4096, 4096, 4096, 4096),
        skips: Sequence[bool] = (True, True, True, True),
        use_biases: bool = True,
        pre_activation: bool = False,
        activation_fn: str = "gelu",
        out_activation_fn: str = "linear",
    ):
        super().__init__()
        if len(skips) != len(layer_depths):
            raise ValueError(f"need one skip flag per hidden layer ({len(layer_depths)}), got {len(skips)}")
        if pre_activation:
            # The published checkpoints use post-activation; the pre-activation output layer is not documented.
            raise ValueError("pre_activation=True is not supported")
        self.skips = list(skips)
        layers, width = [], input_dims
        for depth, skip in zip(layer_depths, skips):
            layers.append(nn.Sequential(nn.Identity(), nn.Linear(width, depth, bias=use_biases), _activation(activation_fn)))
            width = input_dims + depth if skip else depth  # input of the next layer
        layers.append(nn.Sequential(nn.Linear(width, output_dims, bias=use_biases), _activation(out_activation_fn)))
        self.network_layers = nn.ModuleList(layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The published init: xavier-uniform weights, zero biases."""
        for layer in self.network_layers:
            for m in layer:
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.network_layers[0](x)
        for skip, layer in zip(self.skips, self.network_layers[1:]):
            y = layer(torch.cat([x, y], dim=-1) if skip else y)
        return y

    def example_inputs(self, batch: int = 1) -> dict:
        """x [batch, 4, input_dims]: four text tokens."""
        return {"x": torch.randn(batch, 4, self.config["input_dims"], **self._example_factory())}


class ExtendedContextAdapter(nn.Module):
    """Extend mode: ContextAdapter to the teacher's text width, then the teacher's context embedder
    (a Linear to the MMDiT width, kept frozen). [..., student width] -> [..., MMDiT width]."""

    def __init__(self, adapter: ContextAdapter, context_embedder: nn.Linear):
        super().__init__()
        if context_embedder.in_features != adapter.config["output_dims"]:
            raise UsageError(
                f"extend mode: adapter output width {adapter.config['output_dims']} must equal the context "
                f"embedder's input width {context_embedder.in_features}"
            )
        self.adapter = adapter
        self.context_embedder = context_embedder.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.context_embedder(self.adapter(x))

    @torch.no_grad()
    def fold(self) -> ContextAdapter:
        """An RM ContextAdapter computing the same function: the output Linear and the context embedder
        compose into one Linear (needs a linear output activation). For export in the published layout."""
        config = self.adapter.config
        if config["out_activation_fn"] != "linear" or not config["use_biases"]:
            raise UsageError("only an adapter with biases and a linear output activation folds into the context embedder")
        ce = self.context_embedder
        last = f"network_layers.{len(self.adapter.skips)}.0"
        state = dict(self.adapter.state_dict())
        ce_bias = ce.bias if ce.bias is not None else torch.zeros_like(ce.weight[:, 0])
        state[f"{last}.bias"] = ce.weight @ state[f"{last}.bias"] + ce_bias
        state[f"{last}.weight"] = ce.weight @ state[f"{last}.weight"]
        folded = ContextAdapter(**{**config, "output_dims": ce.out_features})
        load_state_dict_checked(folded, state, source="folded extend-mode adapter")
        return folded.to(ce.weight.device, ce.weight.dtype)


# ---------------------------------------------------------------------------------------------------
# LoRA on the student

T5_LORA_TARGETS = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / rank) * up(down(x)). The base Linear is frozen; `up` starts at zero so
    the wrapped layer starts as the base layer. Keys `base.*`, `down.weight`, `up.weight`."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank = rank
        self.scale = (alpha if alpha is not None else rank) / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.down = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.up = nn.Linear(rank, base.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    @property
    def weight(self) -> nn.Parameter:  # read by host models (e.g. T5's FFN checks `wo.weight.dtype`)
        return self.base.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x)) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain Linear with the low-rank update added to the base weight."""
        merged = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        merged = merged.to(self.base.weight.device, self.base.weight.dtype)
        merged.weight.copy_(self.base.weight + self.scale * self.up.weight @ self.down.weight)
        if self.base.bias is not None:
            merged.bias.copy_(self.base.bias)
        return merged


def add_lora(module: nn.Module, rank: int, alpha: float | None = None, targets: Sequence[str] = T5_LORA_TARGETS) -> int:
    """Freeze every parameter of `module` and wrap each nn.Linear whose attribute name is in `targets`
    with a trainable LoRALinear. Returns the number of wrapped layers (UsageError if none)."""
    module.requires_grad_(False)
    found = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear) and name in targets
    ]
    if not found:
        raise UsageError(f"no Linear layer named {', '.join(targets)} to put LoRA on")
    for parent, name, child in found:
        setattr(parent, name, LoRALinear(child, rank, alpha))
    return len(found)


def merge_lora(module: nn.Module) -> nn.Module:
    """Replace every LoRALinear in `module` by its merged Linear (in place); returns `module`."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
    return module


# ---------------------------------------------------------------------------------------------------
# the student text path of text-encoder distillation

TEXT_DISTILL_MODES = ("RM", "EM", "LORA", "TDT5")


class StudentTextPath(nn.Module):
    """Student text encoder -> head: input ids [B, L], attention mask [B, L] -> [B, L, MMDiT width].

    `student` is any module mapping (input_ids, attention_mask) to [B, L, D] (T5TextEncoder, DistilT5).
    The head is the `adapter` (RM, and LORA / TDT5 with an adapter), the adapter followed by the
    frozen `context_embedder` (EM), or the frozen `context_embedder` alone (LORA / TDT5 with
    `adapter=None`). The mode decides what trains (see the module docstring); `trainable_parameters()`
    lists it. A frozen student is kept in eval mode (no dropout) even when the path is put in training mode.
    """

    def __init__(
        self,
        mode: str,
        student: nn.Module,
        adapter: ContextAdapter | None,
        *,
        context_embedder: nn.Linear | None = None,
        lora_rank: int = 8,
        lora_alpha: float | None = None,
        lora_targets: Sequence[str] = T5_LORA_TARGETS,
    ):
        super().__init__()
        mode = mode.upper()
        if mode not in TEXT_DISTILL_MODES:
            raise UsageError(f"unknown text-distillation mode '{mode}'", hint=f"known modes: {', '.join(TEXT_DISTILL_MODES)}")
        if adapter is None and mode in ("RM", "EM"):
            raise UsageError(f"{mode} trains a ContextAdapter: give one")
        if (mode == "EM" or adapter is None) != (context_embedder is not None):
            raise UsageError(
                "extend mode (EM) and an adapter-free LORA / TDT5 need the teacher's context embedder; the other cases take none"
            )
        self.mode = mode
        self.student = student
        if mode == "EM":
            self.adapter = ExtendedContextAdapter(adapter, context_embedder)
        else:
            self.adapter = adapter if adapter is not None else context_embedder.requires_grad_(False)
        if mode == "LORA":
            add_lora(student, lora_rank, lora_alpha, lora_targets)
        else:
            student.requires_grad_(mode == "TDT5")
        self.train(self.training)

    @property
    def student_frozen(self) -> bool:
        return self.mode in ("RM", "EM")

    def train(self, mode: bool = True) -> "StudentTextPath":
        super().train(mode)
        if self.student_frozen:
            self.student.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.adapter(self.student(input_ids, attention_mask))

    def export(self) -> tuple[nn.Module, ContextAdapter | None]:
        """(student, RM ContextAdapter or None) in the published inference layout: LoRA merged into
        the student, an extend-mode adapter folded with the context embedder; None when the student
        feeds the context embedder directly (the MMDiT keeps it)."""
        student = merge_lora(self.student)
        if isinstance(self.adapter, ExtendedContextAdapter):
            return student, self.adapter.fold()
        return student, self.adapter if isinstance(self.adapter, ContextAdapter) else None
