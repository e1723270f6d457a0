"""LoRA sets on a ComfyUI model: low-rank terms applied on the activations during sampling, one plan per step.

The composed MODEL carries one ``APPLY_MODEL`` wrapper. At each model call it finds the step from the sampler's
sigmas, installs forward hooks on the targeted Linear modules for the duration of that call only (removed in a
``finally``: an interrupted run leaves no hook behind), runs the passes the step's plan asks for, each with its own
per-LoRA scales, and combines them. Base weights are never patched, so fp8 and GGUF models work unchanged and
switching LoRAs costs nothing. ``merge`` instead adds ordinary patches, exactly as ComfyUI's LoRA loader does.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from dataclasses import dataclass, field

import comfy.lora
import comfy.lora_convert
import comfy.patcher_extension
import comfy.utils
import torch
from comfy.weight_adapter import LoRAAdapter

from lorweb_ops import LoRWeBError, composed_patches
from lorweb_ops.compose import (
    CombineState,
    ComposeSettings,
    LoraSet,
    SetEntry,
    StepPlan,
    combine,
    composition_plan,
    scheduled_plans,
    step_index,
    strength_schedule,
)
from lorweb_ops.flux_layout import MODEL_PREFIX
from lorweb_ops.lowrank import LowRankTerm, add_row_slices, lowrank_output, weight_fits

from .patching import check_model_fits, comfy_patches

_WRAPPER_KEY = "lorweb_compose"


# ---------------------------------------------------------------------------------------- entries -> patches/terms


def merge_patches(model, entry: SetEntry) -> dict:
    """The ``add_patches`` input of one entry, as ComfyUI's own LoRA loader builds it (strength not included)."""
    if entry.kind == "analogy":
        return comfy_patches(_analogy_patches(model, entry))
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(entry.state), key_map, log_missing=False)
    known = set(model.model_state_dict(filter_prefix=MODEL_PREFIX))
    matched = {k: v for k, v in loaded.items() if (k[0] if isinstance(k, tuple) else k) in known}
    if not matched:
        raise LoRWeBError(
            f"The LoRA {entry.name} has no key that matches this model: it was made for another model "
            "(a Flux LoRA is needed here)."
        )
    return matched


def _analogy_patches(model, entry: SetEntry) -> list:
    """The analogy's composed patches, checked against the model before anything is built from them."""
    patches = composed_patches(entry.basis, entry.weights.coefficients)
    check_model_fits(model, patches, entry.basis.path)
    return patches


def analogy_terms(model, entry: SetEntry) -> list[LowRankTerm]:
    """An analogy's composed patches as terms, straight from the library (no round trip through ComfyUI's adapter)."""
    patches = _analogy_patches(model, entry)
    return [
        LowRankTerm(
            p.target.bfl_layer, p.up, p.down, 1.0, p.target.row_start, p.target.row_count if p.target.fused else None
        )
        for p in patches
    ]


def lowrank_terms(model, entry: SetEntry) -> list[LowRankTerm]:
    """The entry as terms on the activations; refuses what cannot be expressed there, saying what to use."""
    if entry.kind == "analogy":
        return analogy_terms(model, entry)
    terms = []
    # a LoRA file as ComfyUI's own loader reads it; its LoRAAdapter holds (up, down, alpha, mid, dora, reshape)
    for spec, value in merge_patches(model, entry).items():
        key, offset, function = _split_spec(spec)
        if not isinstance(value, LoRAAdapter):
            kind = type(value).__name__ if not isinstance(value, tuple) else f"'{value[0]}'"
            raise LoRWeBError(
                f"The LoRA {entry.name} holds a {kind} patch for {key}; only low-rank LoRA (up/down) layers can be "
                "composed per step on the activations. Use method 'merge' (or LoraLoaderModelOnly) for this file."
            )
        up, down, alpha, mid, dora, reshape = value.weights
        if mid is not None or dora is not None or reshape is not None:
            raise LoRWeBError(
                f"The LoRA {entry.name} uses LoCon/DoRA/reshape for {key}, which changes the weight itself; it "
                "cannot be composed per step on the activations. Use method 'merge' (or LoraLoaderModelOnly)."
            )
        up, down = up.flatten(start_dim=1), down.flatten(start_dim=1)
        if function is not None:
            if getattr(function, "__name__", "") != "swap_scale_shift":
                raise LoRWeBError(f"The LoRA {entry.name} needs a weight function for {key}; use method 'merge'.")
            up = comfy.utils.swap_scale_shift(up)  # the function swaps rows of the delta, i.e. rows of up
        scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
        start, count = (offset[1], offset[2]) if offset else (0, None)
        if offset and offset[0] != 0:
            raise LoRWeBError(f"The LoRA {entry.name} patches {key} along dimension {offset[0]}; use method 'merge'.")
        terms.append(LowRankTerm(key[len(MODEL_PREFIX) : -len(".weight")], up, down, scale, start, count))
    _check_terms(model, entry, terms)
    return terms


def _split_spec(spec) -> tuple[str, tuple | None, object]:
    if isinstance(spec, str):
        return spec, None, None
    return spec[0], spec[1] if len(spec) > 1 else None, spec[2] if len(spec) > 2 else None


def _check_terms(model, entry: SetEntry, terms: list[LowRankTerm]) -> None:
    """Every term must land on a Linear of matching width with room for its rows."""
    diffusion = model.model.diffusion_model
    for term in terms:
        try:
            module = diffusion.get_submodule(term.module)
        except AttributeError:
            raise LoRWeBError(f"The LoRA {entry.name} targets {term.module}, which this model does not have.") from None
        weight = getattr(module, "weight", None)
        shape = tuple(getattr(weight, "tensor_shape", getattr(weight, "shape", ())))
        rows = term.row_count if term.row_count is not None else term.up.shape[0]
        sliced = term.row_count is not None
        if term.up.shape[0] != rows or not weight_fits(shape, term.down.shape[1], term.row_start, rows, sliced=sliced):
            raise LoRWeBError(
                f"The LoRA {entry.name} does not fit {term.module}: the layer is {list(shape)}, the LoRA needs "
                f"rows {term.row_start}..{term.row_start + rows} x {term.down.shape[1]} columns."
            )


# ------------------------------------------------------------------------------------------------- model builders


def merged_model(model, lora_set: LoraSet):
    """``merge``: every entry's patches at its strength, as chained LoraLoaderModelOnly nodes would add them."""
    clone = model.clone()
    for entry in lora_set.entries:
        patches = merge_patches(model, entry)
        added = clone.add_patches(patches, strength_patch=entry.strength)
        if len(added) != len(patches):
            raise LoRWeBError(f"ComfyUI accepted {len(added)} of {len(patches)} patches of {entry.name}.")
    return clone


def composed_model(model, lora_set: LoraSet, settings: ComposeSettings, high_count: int):
    """A clone of ``model`` that composes the set per step on the activations (switch, composite, cmlora)."""
    plan = _PlanSource(settings, len(lora_set.entries), high_count)
    return _wrapped(model, lora_set, plan)


def scheduled_model(model, lora_set: LoraSet, start: float, end: float, values: tuple[float, ...]):
    """A clone applying every entry at its strength times a per-step multiplier (one pass per step)."""
    strength_schedule(2, start, end, values)  # checks the numbers before anything is built
    return _wrapped(model, lora_set, _SchedulePlan(start, end, values, len(lora_set.entries)))


def _wrapped(model, lora_set: LoraSet, plan_source):
    if not lora_set.entries:
        raise LoRWeBError("The LoRA set is empty: add at least one LoRA or analogy with the LoRA Set nodes.")
    terms = [lowrank_terms(model, entry) for entry in lora_set.entries]  # every check before the clone
    clone = model.clone()
    runtime = ComposeRuntime(terms, [e.strength for e in lora_set.entries], plan_source)
    # a fresh key per node run: wrappers of an upstream composition stay and nest instead of being replaced
    key = f"{_WRAPPER_KEY}_{uuid.uuid4().hex}"
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, runtime)
    # after sampling, drop the cached contributions and the factors moved to the device (the call log stays)
    clone.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, key, runtime.release)
    return clone


class _PlanSource:
    def __init__(self, settings: ComposeSettings, count: int, high_count: int):
        settings.check()
        self.settings, self.count, self.high_count = settings, count, high_count
        composition_plan(settings, 2, count, high_count)  # fail at node time, not inside the sampler

    def plans(self, steps: int) -> list[StepPlan]:
        return composition_plan(self.settings, steps, self.count, self.high_count)


class _SchedulePlan:
    def __init__(self, start: float, end: float, values: tuple[float, ...], count: int):
        self.start, self.end, self.values, self.count = start, end, values, count

    def plans(self, steps: int) -> list[StepPlan]:
        return scheduled_plans(steps, self.count, self.start, self.end, self.values)


# ---------------------------------------------------------------------------------------------------- the runtime


@dataclass
class _RunState:
    """One sampling run (keyed by the sampler's sigma tensor): its plan and what the combine keeps between calls."""

    sigmas: object
    sigma_list: list[float]
    plans: list[StepPlan]
    combined: CombineState = field(default_factory=CombineState)


class ComposeRuntime:
    """The ``APPLY_MODEL`` wrapper. Holds only immutable terms; per-run state lives in ``state``."""

    def __init__(self, terms: list[list[LowRankTerm]], strengths: list[float], plan_source):
        self.terms, self.strengths, self.plan_source = terms, strengths, plan_source
        self.by_module: dict[str, list[tuple[int, LowRankTerm]]] = {}
        for index, entry_terms in enumerate(terms):
            for term in entry_terms:
                self.by_module.setdefault(term.module, []).append((index, term))
        self.state: _RunState | None = None
        self._moved: dict = {}
        self._lock = threading.Lock()

    # ComfyUI may deep-copy model_options; the runtime is shared, not copied (its terms are large)
    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kw):
        transformer_options = transformer_options if transformer_options is not None else {}
        sigmas = transformer_options.get("sample_sigmas")
        if sigmas is None:
            raise LoRWeBError(
                "The composed LoRAs need the sampler's sigma list to know the step; sample this MODEL with a stock "
                "sampler node (KSampler, KSamplerAdvanced, SamplerCustom or SamplerCustomAdvanced)."
            )
        state = self._state_for(sigmas)
        step = step_index(state.sigma_list, float(t.reshape(-1)[0]))
        plan = state.plans[step]

        def run(scales: list[float]) -> torch.Tensor:
            with self._hooks(executor.class_obj.diffusion_model, scales):
                return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)

        cache_key = (tuple(transformer_options.get("cond_or_uncond", ())), tuple(x.shape))
        return combine(run, plan, step, self.strengths, state.combined, cache_key)

    def release(self, patcher=None) -> None:
        with self._lock:
            if self.state is not None:
                self.state.combined.deltas = {}
            self._moved = {}

    def _state_for(self, sigmas) -> _RunState:
        with self._lock:
            if self.state is None or self.state.sigmas is not sigmas:
                sigma_list = [float(s) for s in sigmas.reshape(-1)]
                plans = self.plan_source.plans(len(sigma_list) - 1)
                self.state = _RunState(sigmas, sigma_list, plans)
                self._moved.clear()  # factors moved for the previous run may sit on another device
            return self.state

    def _hook(self, active: list[tuple[float, LowRankTerm]]):
        def hook(module, args, output):
            x = args[0]
            deltas = [
                (term.row_start, lowrank_output(self._on_device(term, x), x, strength)) for strength, term in active
            ]
            return add_row_slices(output, deltas)

        return hook

    def _on_device(self, term: LowRankTerm, x: torch.Tensor) -> LowRankTerm:
        """The term with its factors on ``x``'s device and dtype, converted once per run and device."""
        if term.up.device == x.device and term.up.dtype == x.dtype and term.down.dtype == x.dtype:
            return term
        key = (id(term), x.device, x.dtype)
        moved = self._moved.get(key)
        if moved is None:
            moved = LowRankTerm(
                term.module,
                term.up.to(device=x.device, dtype=x.dtype),
                term.down.to(device=x.device, dtype=x.dtype),
                term.scale,
                term.row_start,
                term.row_count,
            )
            self._moved[key] = moved
        return moved

    @contextlib.contextmanager
    def _hooks(self, diffusion_model, scales: list[float]):
        handles = []
        try:
            if any(scales):
                for name, items in self.by_module.items():
                    active = [(scales[j], term) for j, term in items if scales[j]]
                    if active:
                        module = diffusion_model.get_submodule(name)
                        handles.append(module.register_forward_hook(self._hook(active)))
            yield
        finally:
            for handle in handles:
                handle.remove()


def runtime_of(model) -> list[ComposeRuntime]:
    """The composition wrappers a MODEL carries (tests and benchmarks read their call log)."""
    wrappers = model.wrappers.get(comfy.patcher_extension.WrappersMP.APPLY_MODEL, {})
    return [w for key, items in wrappers.items() if key.startswith(_WRAPPER_KEY) for w in items]
