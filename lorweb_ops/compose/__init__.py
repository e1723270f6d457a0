"""Composing several LoRAs over the denoising steps (LoRA Switch, LoRA Composite, CMLoRA) as plain maths.

``schedule``: what each step runs; ``combine``: how the step's passes make its prediction; ``lora_set``: the
LoRAs composed; ``frequency``: CMLoRA's frequency profile that orders them. The ComfyUI glue
(``lorweb_comfy/compose_runtime.py``) applies the low-rank terms (``lorweb_ops/lowrank.py``) and calls these.
"""

from .combine import CombineState, combine
from .frequency import (
    frequency_score,
    grayscale_uint8,
    high_frequency_score,
    partition,
    radial_profile,
    render_profiles,
)
from .lora_set import LoraSet, SetEntry
from .schedule import (
    CACHE_MODES,
    DEFAULT_LATE_FRACTION,
    METHODS,
    ComposeSettings,
    StepPlan,
    caching_active,
    cmlora_weights,
    composition_plan,
    dominant_schedule,
    late_start,
    nonuniform_steps,
    parse_strengths,
    refresh_steps,
    rotation_steps,
    scheduled_plans,
    step_index,
    strength_schedule,
    switch_schedule,
)

__all__ = [
    "CACHE_MODES",
    "DEFAULT_LATE_FRACTION",
    "METHODS",
    "CombineState",
    "ComposeSettings",
    "LoraSet",
    "SetEntry",
    "StepPlan",
    "caching_active",
    "cmlora_weights",
    "combine",
    "composition_plan",
    "dominant_schedule",
    "frequency_score",
    "grayscale_uint8",
    "high_frequency_score",
    "late_start",
    "nonuniform_steps",
    "parse_strengths",
    "partition",
    "radial_profile",
    "refresh_steps",
    "render_profiles",
    "rotation_steps",
    "scheduled_plans",
    "step_index",
    "strength_schedule",
    "switch_schedule",
]
