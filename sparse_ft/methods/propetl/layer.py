"""ProPETL's pieces: learned binary masks, the shared prototypes and the layers that use them.

One :class:`ProPETLShared` module hangs off the model (``model.sparse_ft_propetl``). It holds one
prototype per target group (a LoRA pair per targeted projection, or one Pfeiffer adapter) and, in
multi-task runs, per-task scores. Each adapted layer (:class:`ProPETLLoRALinear`,
:class:`ProPETLAdapterLinear`) owns float scores shaped like the prototype tensors it masks and
reads the prototype through a plain reference, not as a submodule, so the prototype's parameters
have one name and one owner.

A layer is in one of two modes. Training: ``scores_<tensor>`` are parameters and the mask is the
top-k of ``|scores|`` per tensor, recomputed every forward, with a straight-through gradient.
Frozen (a loaded delta): ``mask_<tensor>`` buffers hold the bit-packed masks and no scores exist.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...ops.sparse_delta import _linear
from ...zero import gathered
from ..base import DeltaLinear

SHARED_ATTR = "sparse_ft_propetl"


# -- masks ---------------------------------------------------------------------------------------
def keep_count(numel: int, keep_ratio: float) -> int:
    """How many entries a top-k mask of ``numel`` entries keeps: ``round(keep_ratio * numel)``."""
    return int(round(keep_ratio * numel))


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Binary mask (dtype of ``scores``) with ones at the ``k`` largest ``|scores|``; exactly ``k``
    ones whatever the ties (``torch.topk`` picks among equal values)."""
    flat = scores.detach().reshape(-1)
    mask = torch.zeros_like(flat)
    if k >= flat.numel():
        return mask.fill_(1).view_as(scores)
    idx = torch.topk(flat.float().abs(), k, sorted=False).indices
    mask.index_fill_(0, idx, 1)
    return mask.view_as(scores)


class _StraightThroughTopK(torch.autograd.Function):
    """``h(s)`` = top-k mask of ``|s|``; backward treats ``h`` as the identity (edge-popup, paper 003)."""

    @staticmethod
    def forward(ctx, scores, k):
        return topk_mask(scores, k)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def learned_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    return _StraightThroughTopK.apply(scores, k)


def hybrid_mask(layer_mask: torch.Tensor, task_mask: torch.Tensor | None) -> torch.Tensor:
    """Logical OR written so gradients reach both parts: ``1 - (1 - m_task)(1 - m_layer)``."""
    if task_mask is None:
        return layer_mask
    return 1 - (1 - task_mask) * (1 - layer_mask)


_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Flat uint8 tensor with 8 mask entries per byte (entry i at bit i % 8 of byte i // 8)."""
    flat = mask.detach().reshape(-1).to("cpu") != 0
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) * _BIT_WEIGHTS).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: an fp32 0/1 tensor of ``shape``."""
    numel = math.prod(shape)
    bits = (packed.reshape(-1, 1) & _BIT_WEIGHTS.to(packed.device)) != 0
    return bits.reshape(-1)[:numel].float().view(*shape)


def packed_numel(numel: int) -> int:
    return (numel + 7) // 8


# -- prototypes ----------------------------------------------------------------------------------
class LoRAPrototype(nn.Module):
    """One LoRA pair shared by every layer of a target group: ``dW = scale (B*m_B)(A*m_A)``."""

    kind = "lora"
    masked = ("lora_A", "lora_B")

    def __init__(self, in_features: int, out_features: int, r: int):
        super().__init__()
        self.in_features, self.out_features, self.r = in_features, out_features, r
        a = torch.empty(r, in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A = nn.Parameter(a)
        # B = 0: the adapted model starts as the base model whatever the masks are.
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))


class AdapterPrototype(nn.Module):
    """One Pfeiffer adapter ``h + f(h W_down^T + b_down) W_up^T + b_up`` shared by every layer.

    Masks apply to ``down`` and ``up`` only; the biases are shared unmasked (paper 003, eq. 8)."""

    kind = "adapter"
    masked = ("down", "up")

    def __init__(self, features: int, bottleneck: int):
        super().__init__()
        self.features, self.bottleneck = features, bottleneck
        down = torch.empty(bottleneck, features)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        self.down = nn.Parameter(down)
        self.down_bias = nn.Parameter(torch.zeros(bottleneck))
        # Up-projection at zero (as AdapterHub): the adapter starts as the identity.
        self.up = nn.Parameter(torch.zeros(features, bottleneck))
        self.up_bias = nn.Parameter(torch.zeros(features))


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


def init_scores(shape, generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform scores (edge-popup's init), drawn on a seeded CPU generator."""
    scores = torch.empty(shape)
    fan_in = shape[1] if len(shape) > 1 else shape[0]
    bound = math.sqrt(6.0 / ((1 + 5) * fan_in))  # kaiming_uniform_ with a = sqrt(5), as nn.Linear
    return scores.uniform_(-bound, bound, generator=generator)


class ScoreSet(nn.Module):
    """Scores (training) or packed masks (frozen) for each masked tensor of one prototype."""

    def __init__(self, prototype: nn.Module, keep_ratio: float, generator: torch.Generator | None,
                 packed: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.keep_ratio = keep_ratio
        self.shapes = {name: tuple(getattr(prototype, name).shape) for name in prototype.masked}
        self.k = {name: keep_count(math.prod(s), keep_ratio) for name, s in self.shapes.items()}
        self.frozen = packed is not None
        for name, shape in self.shapes.items():
            if self.frozen:
                self.register_buffer(f"mask_{name}", packed[name].to(torch.uint8).clone())
            else:
                self.register_parameter(f"scores_{name}", nn.Parameter(init_scores(shape, generator)))

    def mask(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The binary mask of tensor ``name`` (straight-through to the scores while training)."""
        if self.frozen:
            return unpack_bits(getattr(self, f"mask_{name}"), self.shapes[name]).to(like.device, like.dtype)
        return learned_mask(getattr(self, f"scores_{name}"), self.k[name]).to(like.dtype)

    def packed(self) -> dict[str, torch.Tensor]:
        """``mask_<tensor>`` -> bit-packed mask, as the compact delta stores it. Collective under
        ZeRO-3 (the scores are gathered: they may have been released after an evaluation)."""
        if self.frozen:
            return {f"mask_{name}": getattr(self, f"mask_{name}") for name in self.shapes}
        out = {}
        with gathered(list(self.parameters())):
            for name in self.shapes:
                out[f"mask_{name}"] = pack_bits(topk_mask(getattr(self, f"scores_{name}"), self.k[name]))
        return out

    def mask_bits(self) -> int:
        """Bits the packed masks take in the compact delta (whole bytes per tensor)."""
        return sum(8 * packed_numel(math.prod(s)) for s in self.shapes.values())


class ProPETLShared(nn.Module):
    """Model-level state: ``prototypes[group]`` and, multi-task, ``tasks[task][group]`` scores."""

    def __init__(self, prototypes: dict[str, nn.Module], task_names: list[str]):
        super().__init__()
        self.prototypes = nn.ModuleDict(prototypes)
        self.tasks = nn.ModuleDict()
        self.task_names = list(task_names)
        self.active_task = 0

    def task_mask(self, group: str, name: str, like: torch.Tensor) -> torch.Tensor | None:
        if not self.task_names:
            return None
        active = self.task_names[self.active_task]
        mask = self.tasks[active][group].mask(name, like)
        if torch.is_grad_enabled():
            # The other tasks' scores join the graph with weight 0. ZeRO gives a parameter that got no
            # gradient a zero one (its Adam moments keep moving); plain PyTorch would skip it. With this
            # every ZeRO stage and world size trains the same way.
            for task, groups in self.tasks.items():
                scores = groups[group]
                if task != active and not scores.frozen:
                    mask = mask + 0 * getattr(scores, f"scores_{name}").to(mask.dtype)
        return mask

    def group_parameters(self, group: str) -> list[nn.Parameter]:
        """Parameters a layer of ``group`` reads besides its own (prototype and task scores)."""
        params = list(self.prototypes[group].parameters())
        for task in self.tasks.values():
            params += list(task[group].parameters())
        return params


def register_external(module: nn.Module, params: list[nn.Parameter]) -> None:
    """Tell ZeRO-3 that ``module``'s forward reads ``params`` it does not own (the prototype)."""
    try:
        from deepspeed.zero import register_external_parameter
    except ImportError:  # no DeepSpeed: nothing partitions parameters
        return
    for p in params:
        register_external_parameter(module, p)


class _ProPETLLayer(DeltaLinear):
    """Shared plumbing of both kinds: the prototype reference, the scores and the masked tensors."""

    def __init__(self, base: nn.Linear, shared: ProPETLShared, group: str, scores: ScoreSet):
        super().__init__(base)
        # A plain reference: registering the shared module here would give it one parent per layer.
        object.__setattr__(self, "_shared", shared)
        self.group = group
        self.masks = scores
        register_external(self, shared.group_parameters(group))

    @property
    def prototype(self) -> nn.Module:
        return self._shared.prototypes[self.group]

    def masked(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """``prototype.<name> * m`` with ``m`` this layer's mask OR'ed with the active task's."""
        proto = getattr(self.prototype, name).to(dtype)
        m = hybrid_mask(self.masks.mask(name, proto), self._shared.task_mask(self.group, name, proto))
        return proto * m

    def method_parameters(self) -> list[nn.Parameter]:
        return list(self.masks.parameters()) + self._shared.group_parameters(self.group)

    def delta_tensors(self) -> dict[str, torch.Tensor]:
        return self.masks.packed()


class ProPETLLoRALinear(_ProPETLLayer):
    """``y = x W^T + b + scale * x (A*m_A)^T (B*m_B)^T`` with A, B the group's shared prototype."""

    def __init__(self, base: nn.Linear, shared: ProPETLShared, group: str, scores: ScoreSet, scale: float):
        super().__init__(base, shared, group, scores)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.masked("lora_A", x.dtype)
        b = self.masked("lora_B", x.dtype)
        return self.base_forward(x) + (x @ a.t() @ b.t()) * self.scale

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        return (self.masked("lora_B", torch.float32) @ self.masked("lora_A", torch.float32)) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group={self.group}, scale={self.scale:g}"


class ProPETLAdapterLinear(_ProPETLLayer):
    """The feed-forward block's output projection followed by the masked shared adapter:
    ``h = x W^T + b``, ``y = h + f(h (W_down*m)^T + b_down) (W_up*m)^T + b_up``."""

    def __init__(self, base: nn.Linear, shared: ProPETLShared, group: str, scores: ScoreSet, activation: str):
        super().__init__(base, shared, group, scores)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_forward(x)
        proto = self.prototype
        down = self.masked("down", h.dtype)
        up = self.masked("up", h.dtype)
        z = ACTIVATIONS[self.activation](_linear(h, down, proto.down_bias.to(h.dtype)))
        return h + _linear(z, up, proto.up_bias.to(h.dtype))

    def delta_weight(self) -> torch.Tensor:
        raise ConfigError(
            "ProPETL with method.prototype = adapter adds a non-linear module after the feed-forward block; it "
            "cannot be merged into the base weights or exported as a plain Hugging Face checkpoint. Keep the "
            "compact delta (delta.safetensors) and load it onto the base with sparse_ft.load_delta(model, path)")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group={self.group}, activation={self.activation}"
