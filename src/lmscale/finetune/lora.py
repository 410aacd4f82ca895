"""LoRA: train a low-rank update of chosen linear layers while their weights stay frozen.

A wrapped layer computes (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models")

    x ──► base (frozen W, or QuantizedLinear) ────────────────► (+) ──► y
     └──► dropout ──► A (r × in) ──► B (out × r) ──► × alpha/r ──┘

A starts kaiming-uniform and B at zero, so a fresh adapter leaves the model exactly as it was.
Only A and B train, and only they are saved. Merging folds the update into the weight,
W' = W + (alpha/r) B A, so inference costs nothing extra; unmerging subtracts it again.

Several named adapters can sit on one model; `set_adapter` picks the one that runs (or none).
Over a quantized base (QLoRA) the integers stay frozen and untouched: merging in place is
refused there, as PEFT refuses for 4-bit weights unless asked to dequantize, because rounding
W + BA back to int4 would lose most of the update. `merge_and_unload(model, dequantize=True)`
replaces such a layer by a float `nn.Linear` holding dequantized W plus the update instead.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmscale.errors import LmscaleError
from lmscale.model.quantized import QuantizedLinear

DEFAULT_ADAPTER = "default"

# Short target names -> the module-name suffix they stand for, per model family.
SHORT_TARGETS = {
    "llama": {
        "q": "attention.wq", "k": "attention.wk", "v": "attention.wv", "o": "attention.wo",
        "gate": "feed_forward.w1", "up": "feed_forward.w3", "down": "feed_forward.w2",
    },
    "gpt2": {
        "q": "attention.wq", "k": "attention.wk", "v": "attention.wv", "o": "attention.wo",
        "up": "feed_forward.w1", "down": "feed_forward.w2",
    },
}  # fmt: skip
ALL_LINEAR = "all-linear"
"""Every linear layer of the blocks (not the output head), as PEFT's `target_modules`."""


@dataclass
class LoRAConfig:
    """Which layers get an adapter, and its shape."""

    rank: int = 8
    """r: the inner width of the update B A."""
    alpha: float = 16.0
    """The update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input while training (the base path has none)."""
    targets: tuple[str, ...] = ("q", "k", "v", "o")
    """Short names (q, k, v, o, gate, up, down), `all-linear`, or fnmatch patterns on module
    names (e.g. `layers.*.attention.wq`, `*.w2`)."""

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(self.targets)
        if not isinstance(self.rank, int) or self.rank < 1:
            raise LmscaleError(f"--rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise LmscaleError(f"--alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LmscaleError(f"--dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise LmscaleError("--targets names no layer (e.g. q,k,v,o)")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """A frozen linear layer (`nn.Linear` or `QuantizedLinear`) plus named low-rank adapters.

    Args:
        base: the layer to adapt; its parameters are frozen here.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if not isinstance(base, (nn.Linear, QuantizedLinear)):
            raise LmscaleError(f"LoRA wraps linear layers, not {type(base).__name__}")
        self.base = base.requires_grad_(False)
        self.lora_A = nn.ModuleDict()  # name -> nn.Linear(in, r), weight (r, in)
        self.lora_B = nn.ModuleDict()  # name -> nn.Linear(r, out), weight (out, r)
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active: str | None = None
        """The adapter that runs; None runs the base alone."""
        self.merged: str | None = None
        """The adapter whose update is folded into the base weight, if any."""
        self.train(base.training)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def add_adapter(self, name: str, config: LoRAConfig) -> None:
        """Add adapter `name` (A kaiming-uniform, B zero) and make it the active one."""
        if name in self.lora_A:
            raise LmscaleError(f"adapter '{name}' already exists on this layer")
        param = self._base_param()
        factory = {"device": param.device, "dtype": param.dtype, "bias": False}
        a = nn.Linear(self.in_features, config.rank, **factory)
        b = nn.Linear(config.rank, self.out_features, **factory)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))  # nn.Linear's own init, as PEFT
        nn.init.zeros_(b.weight)
        self.lora_A[name], self.lora_B[name] = a, b
        dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.lora_dropout[name] = dropout.train(self.training)  # a model in eval stays in eval
        self.scaling[name] = config.scaling
        self.active = name

    def _base_param(self) -> Tensor:
        # A QuantizedLinear's float tensor is its scales; the adapter trains in that dtype.
        return self.base.weight if isinstance(self.base, nn.Linear) else self.base.scales

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)  # (..., out)
        name = self.active
        if name is None or self.merged is not None:  # a merged update is already in the base
            return y
        a, b = self.lora_A[name], self.lora_B[name]
        h = self.lora_dropout[name](x.to(a.weight.dtype))
        return y + (b(a(h)) * self.scaling[name]).to(y.dtype)  # (..., in) -> (..., r) -> (..., out)

    def delta_weight(self, name: str) -> Tensor:
        """The update (alpha/r) B A of adapter `name`, (out, in)."""
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapter into the float base weight (W += (alpha/r) B A)."""
        if self.merged is not None or self.active is None:
            return
        if not isinstance(self.base, nn.Linear):
            raise LmscaleError(
                "cannot merge into a quantized base in place (rounding W + BA back to integers "
                "would lose the update): use merge_and_unload(model, dequantize=True)"
            )
        weight = self.base.weight
        weight += self.delta_weight(self.active).to(weight.dtype)
        self.merged = self.active

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract a merged adapter from the base weight again."""
        if self.merged is None:
            return
        weight = self.base.weight
        weight -= self.delta_weight(self.merged).to(weight.dtype)
        self.merged = None

    def unloaded(self, dequantize: bool = False) -> nn.Module:
        """The plain layer with the active adapter folded in (a float `nn.Linear` if the base
        is quantized and `dequantize`); the base of an inactive wrapper comes back unchanged."""
        if self.active is None and self.merged is None:
            return self.base
        if isinstance(self.base, nn.Linear):
            self.merge()
            return self.base
        if not dequantize:
            self.merge()  # raises the explanation
        with torch.no_grad():
            weight = self.base.dequantize(torch.float32) + self.delta_weight(self.active).float()
            linear = nn.Linear(
                self.in_features, self.out_features, bias=self.base.bias is not None,
                device=weight.device,
            )  # fmt: skip
            linear.weight.copy_(weight)
            if self.base.bias is not None:
                linear.bias.copy_(self.base.bias)
        return linear.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"adapters={list(self.lora_A)}, active={self.active}, merged={self.merged}"


def resolve_targets(model: nn.Module, targets: tuple[str, ...] | list[str]) -> list[str]:
    """Fully-qualified names of the linear layers that `targets` select, in model order.

    Args:
        model: the model (a `Transformer`; its `config.family` picks the short-name map).
        targets: short names, `all-linear`, exact names or fnmatch patterns.

    Returns:
        The names; every target must select at least one linear layer.
    """
    family = getattr(getattr(model, "config", None), "family", "llama")
    short = SHORT_TARGETS.get(family, SHORT_TARGETS["llama"])
    linear = _linear_layers(model)
    chosen: set[str] = set()
    for target in targets:
        if target == ALL_LINEAR:
            found = [n for n in linear if n.startswith("layers.")]
        elif target in short:
            found = [n for n in linear if n.endswith("." + short[target])]
        else:
            found = [n for n in linear if fnmatch.fnmatchcase(n, target)]
        if not found:
            raise LmscaleError(
                f"LoRA target '{target}' matches no linear layer (short names: "
                f"{', '.join(short)}, {ALL_LINEAR}; or a pattern such as 'layers.*.attention.wq')"
            )
        chosen.update(found)
    return [name for name in linear if name in chosen]


def _linear_layers(model: nn.Module) -> list[str]:
    """Layers LoRA can wrap: linear, quantized linear, or already wrapped (not their insides)."""
    names: list[str] = []
    wrapped: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(module, LoRALinear):
            wrapped.append(name)
        if isinstance(module, (nn.Linear, QuantizedLinear, LoRALinear)):
            names.append(name)
    return names


def apply_lora_(model: nn.Module, config: LoRAConfig, name: str = DEFAULT_ADAPTER) -> list[str]:
    """Add adapter `name` to the layers `config.targets` selects, in place, and activate it.

    Every other parameter of the model is frozen, and adapter `name` alone trains.

    Args:
        model: the model to adapt (float or quantized base).
        config: rank, alpha, dropout and targets.
        name: the adapter's name; several can coexist (see `set_adapter`).

    Returns:
        The fully-qualified names of the adapted layers.
    """
    if any(isinstance(m, LoRALinear) and m.merged for m in model.modules()):
        raise LmscaleError("unmerge the model's adapters before adding another")
    names = resolve_targets(model, config.targets)
    for module_name in names:
        module = model.get_submodule(module_name)
        if not isinstance(module, LoRALinear):
            module = LoRALinear(module)
            model.set_submodule(module_name, module)
        module.add_adapter(name, config)
    set_adapter(model, name)
    mark_trainable_(model, name)
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every `LoRALinear` of the model by fully-qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_names(model: nn.Module) -> list[str]:
    """The adapters present on the model, in the order they were added."""
    names: dict[str, None] = {}
    for layer in lora_layers(model).values():
        names.update(dict.fromkeys(layer.lora_A))
    return list(names)


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Run adapter `name` from now on (None: the base model alone). Refused while merged."""
    layers = lora_layers(model).values()
    if name is not None and name not in adapter_names(model):
        known = ", ".join(adapter_names(model)) or "none"
        raise LmscaleError(f"no adapter named '{name}' on this model (present: {known})")
    if any(layer.merged is not None and layer.merged != name for layer in layers):
        raise LmscaleError("an adapter is merged into the weights: unmerge it before switching")
    for layer in layers:
        layer.active = name if name in layer.lora_A else None


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model alone inside the block, then restore each layer's active adapter."""
    layers = lora_layers(model).values()
    saved = [layer.active for layer in layers]
    set_adapter(model, None)
    try:
        yield
    finally:
        for layer, active in zip(layers, saved, strict=True):
            layer.active = active


def mark_trainable_(model: nn.Module, name: str) -> None:
    """Freeze every parameter except adapter `name`'s A and B."""
    model.requires_grad_(False)
    for layer in lora_layers(model).values():
        if name in layer.lora_A:
            layer.lora_A[name].requires_grad_(True)
            layer.lora_B[name].requires_grad_(True)


def adapter_state_dict(model: nn.Module, name: str = DEFAULT_ADAPTER) -> dict[str, Tensor]:
    """Adapter `name`'s tensors: `<layer>.lora_A.weight` (r, in), `<layer>.lora_B.weight` (out, r)."""
    state = {}
    for layer_name, layer in lora_layers(model).items():
        if name in layer.lora_A:
            state[f"{layer_name}.lora_A.weight"] = layer.lora_A[name].weight.detach()
            state[f"{layer_name}.lora_B.weight"] = layer.lora_B[name].weight.detach()
    return state


def merge_lora_(model: nn.Module) -> None:
    """Fold the active adapter into every adapted float weight, in place (see `LoRALinear.merge`)."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora_(model: nn.Module) -> None:
    """Undo `merge_lora_`: the weights are the base's again, the adapter runs on the side."""
    for layer in lora_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Fold the active adapter in and put plain layers back: a model with no LoRA left.

    Args:
        model: a model with adapters; changed in place.
        dequantize: a quantized base becomes a float `nn.Linear` (dequantized W + update);
            without it such a layer is refused.

    Returns:
        The same model.
    """
    for layer_name, layer in lora_layers(model).items():
        model.set_submodule(layer_name, layer.unloaded(dequantize))
    return model
