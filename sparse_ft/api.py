"""The public in-memory API: apply a method, list what it trains, merge it back."""
from __future__ import annotations

import logging

import torch
from torch import nn

from .errors import ConfigError
from .methods import DeltaLinear, MethodConfig
from .methods.base import find_targets, replace_module
from .quant import dequantize, keep_standard_4bit_layout, model_dtype
from .zero import gathered

logger = logging.getLogger("sparse_ft")

CONFIG_ATTR = "sparse_ft_config"


def method_config(model: nn.Module) -> MethodConfig | None:
    """The method config a model was adapted with, or None."""
    return getattr(model, CONFIG_ATTR, None)


def apply(model: nn.Module, config: MethodConfig, delta: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Adapt ``model`` in place with the method ``config`` describes and freeze everything else.

    Target ``nn.Linear`` layers are replaced by the method's layers, which keep the original weight
    ``Parameter`` (so this works on a model whose weights ZeRO-3 has already partitioned). Returns
    ``model``.
    """
    if not isinstance(config, MethodConfig):
        raise ConfigError(f"expected a method config such as RandomMaskConfig, got {type(config).__name__}")
    if method_config(model) is not None:
        raise ConfigError("this model already has a sparse-ft method applied; merge it first or start "
                          "from the base model")
    targets = find_targets(model, config.target_modules) if config.target_modules else []
    keep_standard_4bit_layout(model)  # a quantized base computes the same on every CPU (sparse_ft.quant)
    for p in model.parameters():
        p.requires_grad_(False)
    config.apply_to(model, targets, delta=delta)
    object.__setattr__(model, CONFIG_ATTR, config)
    logger.info(config.describe(model))
    return model


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``[(name, parameter)]`` of everything the applied method trains."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def delta_layers(model: nn.Module) -> list[tuple[str, DeltaLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DeltaLinear)]


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every method delta into its base weight and put plain ``nn.Linear`` layers back.

    On a quantized base each adapted layer is dequantized first and becomes a plain ``nn.Linear``
    in the model's dtype; the layers no method adapted stay quantized.

    The merged model has no sparse-ft modules left: ``save_pretrained`` writes a checkpoint that
    ``transformers`` loads without sparse-ft. Under ZeRO-3 each layer is gathered in turn (call on
    every rank); rank 0's merged weight is scattered back to the partitions.
    """
    config = method_config(model)
    dense_dtype = model_dtype(model)
    for name, layer in delta_layers(model):
        if layer.quantized:
            # Packed weights cannot hold W + dW: the merged layer becomes a plain one with the
            # dequantized weight plus the delta, in the model's dtype (other layers stay quantized).
            with gathered([layer.weight, *layer.method_parameters()]):
                w = dequantize(layer.weight) + layer.delta_weight().to(layer.weight.device)
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            plain.weight = nn.Parameter(w.to(dense_dtype), requires_grad=False)
            plain.bias = layer.bias
            replace_module(model, name, plain)
            logger.info("merge: %s was quantized; dequantized to %s before adding the delta", name, dense_dtype)
            continue
        params = [layer.weight, layer.bias, *layer.method_parameters()]
        with gathered(params, modifier_rank=0):
            w = layer.weight
            w.data.copy_((w.data.float() + layer.delta_weight().to(w.device)).to(w.dtype))
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight = layer.weight
        plain.bias = layer.bias
        replace_module(model, name, plain)
    if config is not None:
        config.after_merge(model)
        object.__delattr__(model, CONFIG_ATTR)
    return model
