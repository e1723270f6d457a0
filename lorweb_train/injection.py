"""Inject a trainable basis into a BFL/ComfyUI Flux model: forward hooks on its Linears, mixing per sample.

Every adapted diffusers module is a row range of one BFL Linear (``lorweb_ops.flux_layout``): fused q/k/v and the
single blocks' ``linear1`` hold several modules. The hook adds, per sample ``b``,
``sum_k c[b, k] (x A_k) B_k`` (scale 1, as the reference) in activation space, so one batch can hold different
analogies; ``sign`` = -1 gives LoRA Reverse's negated delta. The base weights are never touched.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorweb_ops.errors import LoRWeBError
from lorweb_ops.flux_layout import BFL_BLOCK_LISTS, flux_target, module_shapes_in
from lorweb_ops.lowrank import add_row_slices, weight_fits

from .basis_module import TrainableBasis


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if is_linear(module)}


def is_linear(module: nn.Module) -> bool:
    """A torch Linear, or a host's quantized one: ComfyUI loads fp8-scaled files (the fp8 Kontext) into its
    mixed-precision Linear, an ``nn.Module`` with ``in_features``/``out_features`` and a quantized weight."""
    if isinstance(module, nn.Linear):
        return True
    sizes = (getattr(module, "in_features", None), getattr(module, "out_features", None))
    return all(isinstance(size, int) for size in sizes) and getattr(module, "weight", None) is not None


def flux_module_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Diffusers module name -> ``(in, out)`` for every block Linear a LoRWeB basis can adapt, in block order."""
    sizes = {name: (linear.in_features, linear.out_features) for name, linear in linear_layers(model).items()}
    shapes = module_shapes_in(sizes)
    if not shapes:
        raise LoRWeBError(
            "the model has no Flux block Linears (double_blocks.N.* / single_blocks.N.*). Load a FLUX.1 Kontext "
            "diffusion model (BFL/ComfyUI layout)."
        )
    return shapes


@dataclass
class _Slot:
    module: str
    row_start: int
    row_count: int


def mixed_lora_output(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, coefficients: torch.Tensor):
    """``sum_k c[b, k] (x[b] A_k) B_k`` for ``x [B, ..., in]``, ``A [K, in, r]``, ``B [K, r, out]``, ``c [B, K]``.

    Two matmuls of rank K*r: the cost of one ordinary LoRA of that rank, with the mix folded in between.
    """
    num_loras, in_features, rank = lora_a.shape
    batch = x.shape[0]
    if coefficients.shape[0] != batch:
        raise LoRWeBError(
            f"the model ran a batch of {batch} but {coefficients.shape[0]} analogies were mixed; every sample "
            "needs its own coefficients."
        )
    flat = x.reshape(batch, -1, in_features)
    if not torch.is_autocast_enabled(x.device.type):
        flat = flat.to(lora_a.dtype)
    down = flat @ lora_a.permute(1, 0, 2).reshape(in_features, num_loras * rank)  # [B, S, K*r]
    scale = coefficients.to(down.dtype).repeat_interleave(rank, dim=1)  # [B, K*r]
    up = (down * scale[:, None, :]) @ lora_b.reshape(num_loras * rank, -1)  # [B, S, out]
    return up.reshape(*x.shape[:-1], up.shape[-1])


class BasisInjector:
    """Hooks a :class:`TrainableBasis` into a Flux model. Set the mix before a forward, clear it after backward."""

    def __init__(self, model: nn.Module, basis: TrainableBasis) -> None:
        self.model, self.basis = model, basis
        self.slots = self._plan(model, basis)
        self._handles: list = []
        self._coefficients: dict[str, torch.Tensor] | None = None
        self._sign: torch.Tensor | None = None

    @staticmethod
    def _plan(model: nn.Module, basis: TrainableBasis) -> dict[str, list[_Slot]]:
        """BFL layer -> the basis modules in it, checked against the model's shapes (a misfit is an error)."""
        linears = linear_layers(model)
        plan: dict[str, list[_Slot]] = {}
        for module in basis.module_names:
            layer = basis.layer(module)
            _, in_features, _ = layer.lora_A.shape
            out_features = layer.lora_B.shape[2]
            target = flux_target(module, in_features, out_features)
            linear = linears.get(target.bfl_layer)
            shape = (linear.out_features, linear.in_features) if linear is not None else ()
            if not weight_fits(shape, in_features, target.row_start, target.row_count, sliced=target.fused):
                found = "missing" if linear is None else f"[{linear.out_features}, {linear.in_features}]"
                raise LoRWeBError(
                    f"the basis module {module} ({in_features} -> {out_features}) does not fit the model's "
                    f"{target.bfl_layer} ({found}). The basis was made for another model size; use a basis "
                    "trained for this model, or start without --init."
                )
            plan.setdefault(target.bfl_layer, []).append(_Slot(module, target.row_start, target.row_count))
        return plan

    def attach(self) -> BasisInjector:
        if self._handles:
            return self
        linears = linear_layers(self.model)
        for bfl_layer, slots in self.slots.items():
            hook = functools.partial(self._hook, sorted(slots, key=lambda s: s.row_start))
            self._handles.append(linears[bfl_layer].register_forward_hook(hook))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def set_mix(self, coefficients: dict[str, torch.Tensor], sign: torch.Tensor | float = 1.0) -> None:
        """Coefficients ``{module: [B, K]}`` for the next forward (and its checkpoint recompute in backward)."""
        self._coefficients = coefficients
        self._sign = torch.as_tensor(sign, dtype=torch.float32)

    def clear_mix(self) -> None:
        self._coefficients, self._sign = None, None

    def _hook(self, slots: list[_Slot], linear: nn.Linear, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if self._coefficients is None:
            return output  # no mix set: the plain base model
        x = inputs[0]
        deltas = []
        for slot in slots:
            layer = self.basis.layer(slot.module)
            coefficients = self._coefficients[slot.module]
            coefficients = coefficients * self._sign.to(coefficients.device).reshape(-1, 1)
            deltas.append((slot.row_start, mixed_lora_output(x, layer.lora_A, layer.lora_B, coefficients)))
        return add_row_slices(output, deltas)


def enable_gradient_checkpointing(model: nn.Module) -> list[nn.Module]:
    """Recompute each Flux block in backward (non-reentrant, so the hooks and kwargs work). Returns the blocks."""
    wrapped = []
    for bfl_block in BFL_BLOCK_LISTS:
        blocks = getattr(model, bfl_block, None)
        if blocks is None:
            continue
        for block in blocks:
            if getattr(block, "_lorweb_checkpointed", None) is None:
                original = block.forward
                block._lorweb_checkpointed = original
                block.forward = functools.partial(_checkpointed, original)
                wrapped.append(block)
    return wrapped


def disable_gradient_checkpointing(model: nn.Module) -> None:
    for bfl_block in BFL_BLOCK_LISTS:
        for block in getattr(model, bfl_block, None) or []:
            original = getattr(block, "_lorweb_checkpointed", None)
            if original is not None:
                del block.forward
                block._lorweb_checkpointed = None


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(functools.partial(_on_copies, forward), *args, use_reentrant=False, **kwargs)


def _on_copies(forward, *args, **kwargs):
    """Run a block on copies of its tensor inputs: ComfyUI's blocks add into their inputs in place (inference
    code), which would change the inputs checkpointing saved for the recompute."""
    args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return forward(*args, **kwargs)
