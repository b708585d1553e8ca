"""Architecture adapters: where a causal LM's decoder blocks are, and which linears in a block to compress.

``get_adapter(model)`` looks ``model.config.model_type`` up in a small registry (llama, mistral,
qwen2, qwen3, opt). Other models get a generic adapter, with a warning: the longest
``nn.ModuleList`` of ``nn.Linear``-bearing modules is taken as the decoder stack, and every
``nn.Linear`` of a block is compressible, each in its own group.

``linear_groups`` lists a block's compressible linears in execution order, grouped by shared input
(the linears of one group see the same activations, so calibration captures them once).
Embeddings, norms and ``lm_head`` are never listed.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

from torch import nn

__all__ = ["Adapter", "get_adapter", "register_adapter", "ADAPTERS"]


@dataclass
class Adapter:
    """How to walk one architecture.

    Attributes:
        model_type: the ``config.model_type`` it serves (``"generic"`` for the fallback).
        layers_path: dotted path of the decoder ``nn.ModuleList`` inside the ``*ForCausalLM`` model.
        linear_groups: names of the compressible linears inside one block, in execution order,
            grouped by shared input.
        generic: True for the fallback adapter, whose ``linears`` lists every ``nn.Linear`` of a block.
    """

    model_type: str
    layers_path: str
    linear_groups: list[list[str]]
    generic: bool = field(default=False)

    @property
    def linear_names(self) -> list[str]:
        """All compressible linear names of a block, flattened, in execution order."""
        return [name for group in self.linear_groups for name in group]

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of ``model`` (a ``*ForCausalLM``, or its base model without the head)."""
        paths = [self.layers_path]
        head, _, rest = self.layers_path.partition(".")
        if rest and head == "model":
            paths.append(rest)  # the base model (e.g. LlamaModel) rather than LlamaForCausalLM
        for path in paths:
            try:
                layers = model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(layers, nn.ModuleList):
                return layers
        raise ValueError(
            f"{type(model).__name__} has no decoder layers at '{self.layers_path}' "
            f"(adapter for model_type '{self.model_type}')"
        )

    def linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        """Name -> module of the compressible linears of one block, in ``linear_names`` order."""
        if self.generic:
            return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
        out: dict[str, nn.Linear] = {}
        for name in self.linear_names:
            try:
                out[name] = block.get_submodule(name)
            except AttributeError as e:
                raise ValueError(
                    f"{type(block).__name__} has no linear '{name}' (adapter for model_type '{self.model_type}')"
                ) from e
        return out


_LLAMA_GROUPS = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]
_OPT_GROUPS = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.out_proj"],
    ["fc1"],
    ["fc2"],
]

ADAPTERS: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter, *model_types: str) -> None:
    """Register ``adapter`` for its ``model_type`` and any extra ``model_types``."""
    for model_type in (adapter.model_type, *model_types):
        ADAPTERS[model_type] = adapter


for _type in ("llama", "mistral", "qwen2", "qwen3"):
    register_adapter(Adapter(_type, "model.layers", _LLAMA_GROUPS))
register_adapter(Adapter("opt", "model.decoder.layers", _OPT_GROUPS))


def _find_layers(model: nn.Module) -> str | None:
    """Path of the longest ``nn.ModuleList`` whose members hold ``nn.Linear`` layers, or None."""
    best, best_len = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) <= best_len:
            continue
        if all(any(isinstance(m, nn.Linear) for m in layer.modules()) for layer in module):
            best, best_len = name, len(module)
    return best


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model`` (a fresh copy: changing it does not change the registry).

    Raises:
        ValueError: ``model`` has no ``config.model_type`` and no recognisable stack of decoder
            layers holding ``nn.Linear`` modules.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    if model_type in ADAPTERS:
        return copy.deepcopy(ADAPTERS[model_type])
    path = _find_layers(model)
    if path is None:
        raise ValueError(
            f"{model_type} is not a supported decoder-only model: no nn.ModuleList of decoder layers "
            "with nn.Linear modules found"
        )
    layers = model.get_submodule(path)
    names = [name for name, m in layers[0].named_modules() if isinstance(m, nn.Linear)]
    warnings.warn(
        f"model_type '{model_type}' has no gqsa adapter: using the generic one (decoder layers at "
        f"'{path}', {len(names)} linears per block, each in its own group); check that this is right",
        stacklevel=2,
    )
    return Adapter(model_type, path, [[n] for n in names], generic=True)
