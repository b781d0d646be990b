"""Full fine-tuning baseline: every parameter trains; no layer is replaced."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from ...errors import ConfigError
from ..base import MethodConfig


@dataclass
class FullFinetuneConfig(MethodConfig):
    method: ClassVar[str] = "full"

    target_modules: list[str] = field(default_factory=list)
    """Unused: full fine-tuning trains all parameters."""

    def model_delta_tensors(self, model: nn.Module) -> dict:
        return dict(model.named_parameters())

    def delta_layer_names(self, delta) -> set[str]:
        return set()

    def export_tensor(self, key, tensor, delta, layers):
        # The delta holds every parameter under the model's names; old checkpoints may lack the
        # base-model prefix ("decoder.layers..." for "model.decoder.layers...").
        for name in (key, f"model.{key}"):
            if name in delta:
                return delta[name].float()
        return tensor

    def export_touches(self, key, delta, layers):
        return key in delta or f"model.{key}" in delta

    def check_quantized(self, quantization: str) -> None:
        raise ConfigError(f"method.name = full with model.quantization = {quantization}: full fine-tuning updates the "
                          "base weights, which a quantized base stores as frozen packed integers; use "
                          "model.quantization=none for full fine-tuning (train.optimizer=adamw8bit still shrinks "
                          "its optimizer state), or a parameter-efficient method on the quantized base")

    def apply_to(self, model: nn.Module, targets: list[tuple[str, nn.Linear]], delta=None) -> None:
        for p in model.parameters():
            p.requires_grad_(True)
