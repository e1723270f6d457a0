"""Composing several LoRAs and analogies over the denoising steps: build a set, profile it, compose it."""

from __future__ import annotations

import math

import comfy.samplers
import folder_paths
import numpy as np
from comfy_api.latest import io, ui

from lorweb_ops import LoRWeBError
from lorweb_ops.checks import show
from lorweb_ops.compose import (
    CACHE_MODES,
    DEFAULT_LATE_FRACTION,
    METHODS,
    ComposeSettings,
    LoraSet,
    SetEntry,
    frequency_score,
    grayscale_uint8,
    high_frequency_score,
    parse_strengths,
    partition,
    radial_profile,
    render_profiles,
)
from lorweb_ops.images import from_pil
from lorweb_ops.safetensors_io import read_lora

from .compose_runtime import composed_model, merge_patches, merged_model, scheduled_model
from .mix_output import StrengthNode, strength_input
from .types import CATEGORY, weights_basis_input, weights_input

LoraSetType = io.Custom("LORWEB_LORA_SET")
COMPOSE_CATEGORY = CATEGORY + "/compose"


def _set_input() -> io.Input:
    return LoraSetType.Input(
        "lora_set", optional=True, tooltip="The set so far (order is kept); leave empty to start a new set."
    )


def _set_output() -> io.Output:
    return LoraSetType.Output(display_name="lora_set", tooltip="The set with this entry appended.")


class LoraSetAddLoRA(StrengthNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRWeB_LoraSetAddLoRA",
            display_name="LoRA Set: Add LoRA",
            category=COMPOSE_CATEGORY,
            description="Appends an ordinary LoRA file from models/loras (any format ComfyUI's LoRA loader reads) "
            "to a LoRA set, for Compose LoRA Set, Frequency Profile or Scheduled LoRA Strength.",
            inputs=[
                _set_input(),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"), tooltip="The LoRA file."),
                strength_input("Strength of this LoRA (as in LoraLoaderModelOnly)."),
            ],
            outputs=[_set_output()],
        )

    @classmethod
    def execute(cls, lora_name: str, strength: float, lora_set: LoraSet | None = None) -> io.NodeOutput:
        if not lora_name.lower().endswith(".safetensors"):
            raise LoRWeBError(
                f"{show(lora_name)} is not a .safetensors file; the pack reads only .safetensors (nothing is "
                "unpickled). Convert it, or load it with the stock LoraLoaderModelOnly and merge."
            )
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        state = read_lora(path)
        entry = SetEntry(name=lora_name, kind="lora", strength=float(strength), state=state)
        return io.NodeOutput((lora_set or LoraSet()).add(entry))


class LoraSetAddAnalogy(StrengthNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRWeB_LoraSetAddAnalogy",
            display_name="LoRA Set: Add Analogy",
            category=COMPOSE_CATEGORY,
            description="Appends a composed LoRWeB analogy (the weights output of an Apply node, with its basis) to "
            "a LoRA set.",
            inputs=[
                _set_input(),
                weights_basis_input(),
                weights_input(),
                strength_input("Strength of this analogy; replaces the strength stored in the weights."),
                io.String.Input("name", default="analogy", tooltip="A name for this entry in reports and plots."),
            ],
            outputs=[_set_output()],
        )

    @classmethod
    def execute(cls, basis, weights, strength: float, name: str, lora_set: LoraSet | None = None) -> io.NodeOutput:
        from lorweb_ops import check_weights_fit

        check_weights_fit(basis, weights)
        entry = SetEntry(name=name or "analogy", kind="analogy", strength=float(strength), basis=basis, weights=weights)
        return io.NodeOutput((lora_set or LoraSet()).add(entry))


class ComposeLoRASet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRWeB_ComposeLoRASet",
            display_name="Compose LoRA Set",
            category=COMPOSE_CATEGORY,
            description="Turns a MODEL and a LoRA set into a MODEL that composes the LoRAs over the denoising steps; "
            "sample it with any stock sampler. merge: all at once (weights summed). switch: one LoRA per step, "
            "rotating every tau steps. composite: every LoRA every step, predictions averaged (N forwards per step). "
            "cmlora: composite with one dominant LoRA at a time and cached contributions of the others. "
            "See docs/compose.md.",
            inputs=[
                io.Model.Input("model", tooltip="A Flux model (any precision, GGUF included)."),
                LoraSetType.Input("lora_set", tooltip="From the LoRA Set nodes or Frequency Profile."),
                io.Combo.Input("method", options=list(METHODS), default="cmlora"),
                io.Int.Input("tau", default=5, min=1, max=1000, tooltip="switch: steps per LoRA."),
                io.Combo.Input(
                    "cache",
                    options=list(CACHE_MODES),
                    default="non-uniform",
                    tooltip="cmlora: when the dominant LoRA advances and its cached contribution is refreshed. "
                    "non-uniform: every 2 steps in the first 37.5 % of steps, every 3 until 87.5 %, every 2 after. "
                    "uniform: every cache_interval steps. off: every LoRA computed fresh every step (N forwards).",
                ),
                io.Int.Input("cache_interval", default=3, min=1, max=1000, tooltip="cmlora, cache uniform: c."),
                io.Float.Input(
                    "late_fraction",
                    default=DEFAULT_LATE_FRACTION,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="cmlora: from this fraction of the steps on, low-frequency LoRAs may dominate "
                    "(0.55 = the reference's step 121 of 220).",
                ),
                io.Int.Input(
                    "low_frequency_count",
                    default=-1,
                    min=-1,
                    max=64,
                    tooltip="cmlora: how many LoRAs at the end of the set are low-frequency. -1: from the Frequency "
                    "Profile if the set went through one, else 0 (manual order: put low-frequency LoRAs last).",
                ),
                io.Boolean.Input(
                    "reference_behaviour",
                    default=False,
                    tooltip="Reproduce the reference code instead of the described method: late threshold at "
                    "step 121 whatever the step count, caching off with the non-uniform schedule, no refresh "
                    "after the threshold, only the first low-frequency LoRA admitted, switch gives the first "
                    "LoRA tau + 1 steps.",
                ),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="A copy of the model; the input is untouched.")],
        )

    @classmethod
    def execute(
        cls,
        model,
        lora_set: LoraSet,
        method: str,
        tau: int,
        cache: str,
        cache_interval: int,
        late_fraction: float,
        low_frequency_count: int,
        reference_behaviour: bool,
    ) -> io.NodeOutput:
        settings = ComposeSettings(method, tau, cache, cache_interval, late_fraction, reference_behaviour)
        settings.check()
        if not lora_set.entries:
            raise LoRWeBError("The LoRA set is empty: add at least one LoRA or analogy with the LoRA Set nodes.")
        if method == "merge":
            return io.NodeOutput(merged_model(model, lora_set))
        return io.NodeOutput(composed_model(model, lora_set, settings, high_count(lora_set, low_frequency_count)))


def high_count(lora_set: LoraSet, low_frequency_count: int) -> int:
    count = len(lora_set.entries)
    if low_frequency_count >= 0:
        if low_frequency_count > count:
            raise LoRWeBError(f"low_frequency_count is {low_frequency_count} but the set has only {count} LoRAs.")
        return count - low_frequency_count
    return count if lora_set.high_count is None else lora_set.high_count


class ScheduledStrength(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRWeB_ScheduledStrength",
            display_name="Scheduled LoRA Strength",
            category=COMPOSE_CATEGORY,
            description="Applies a LoRA set (usually one LoRA or analogy) with a strength that changes over the "
            "steps: each entry's strength times a multiplier going from start to end, or following a list. "
            "Works on the activations (no re-patching, GGUF and fp8 included); one forward per step.",
            inputs=[
                io.Model.Input("model", tooltip="A Flux model."),
                LoraSetType.Input("lora_set", tooltip="From the LoRA Set nodes."),
                io.Float.Input("start", default=1.0, min=-10.0, max=10.0, step=0.01, tooltip="Multiplier at step 0."),
                io.Float.Input("end", default=0.0, min=-10.0, max=10.0, step=0.01, tooltip="At the last step."),
                io.String.Input(
                    "strengths",
                    default="",
                    placeholder="1.0, 1.0, 0.5, 0.0",
                    tooltip="Optional list of multipliers spread evenly over the steps (linear in between); "
                    "replaces start/end when not empty.",
                ),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="A copy of the model; the input is untouched.")],
        )

    @classmethod
    def validate_inputs(cls, strengths: str | None = None) -> bool | str:
        if strengths is None:
            return True
        try:
            parse_strengths(strengths)
        except LoRWeBError as error:
            return str(error)
        return True

    @classmethod
    def execute(cls, model, lora_set: LoraSet, start: float, end: float, strengths: str) -> io.NodeOutput:
        values = tuple(parse_strengths(strengths))
        return io.NodeOutput(scheduled_model(model, lora_set, float(start), float(end), values))


class FrequencyProfile(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRWeB_FrequencyProfile",
            display_name="Frequency Profile",
            category=COMPOSE_CATEGORY,
            description="CMLoRA's ordering: samples your prompt and seed once without LoRAs and once with each "
            "LoRA alone, scores each image's high-frequency content (grayscale, 2-D FFT, shifted log amplitude, "
            "radial mean normalised by its max, mean over radii >= 0.2 of the largest) and returns the set "
            "ordered by the change it causes, high to low, with the high/low partition. Costs N + 1 samplings.",
            inputs=[
                io.Model.Input("model"),
                LoraSetType.Input("lora_set"),
                io.Vae.Input("vae"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF),
                io.Int.Input("steps", default=20, min=1, max=10000),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS),
                io.Float.Input(
                    "threshold",
                    default=0.0,
                    min=-1.0,
                    max=1.0,
                    step=0.001,
                    tooltip="A LoRA is high-frequency when its score change over the image without LoRAs is "
                    "above this.",
                ),
            ],
            outputs=[
                LoraSetType.Output(display_name="lora_set", tooltip="Ordered high -> low, partition attached."),
                io.Image.Output(display_name="plot", tooltip="The radial profiles (relative log amplitude)."),
                io.String.Output(display_name="report", tooltip="Scores and partition as text."),
            ],
        )

    @classmethod
    def execute(
        cls,
        model,
        lora_set,
        vae,
        positive,
        negative,
        latent_image,
        seed,
        steps,
        cfg,
        sampler_name,
        scheduler,
        threshold,
    ) -> io.NodeOutput:
        import nodes

        def generate(sampled_model) -> np.ndarray:
            latent = nodes.common_ksampler(
                sampled_model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image
            )[0]
            return vae.decode(latent["samples"])[0].detach().float().cpu().numpy()

        if not lora_set.entries:
            raise LoRWeBError("The LoRA set is empty: add at least one LoRA or analogy with the LoRA Set nodes.")
        base_image = generate(model)
        profiles = {"no LoRA": radial_profile(grayscale_uint8(base_image))}
        changes = []
        for entry in lora_set.entries:
            alone = model.clone()
            alone.add_patches(merge_patches(model, entry), strength_patch=entry.strength)
            image = generate(alone)
            profiles[entry.name] = radial_profile(grayscale_uint8(image))
            changes.append(high_frequency_score(profiles[entry.name]) - high_frequency_score(profiles["no LoRA"]))
        order, highs = partition(changes, threshold)
        ordered = lora_set.reordered(order, highs, [changes[i] for i in order])
        report = _report(lora_set, order, highs, changes, frequency_score(base_image))
        plot = from_pil(render_profiles(profiles))
        return io.NodeOutput(ordered, plot, report, ui=ui.PreviewImage(plot, cls=cls))


def _report(lora_set: LoraSet, order: list[int], highs: int, changes: list[float], base: float) -> str:
    lines = [f"no LoRA: high-frequency score {base:.5f}"]
    for rank, index in enumerate(order):
        band = "high" if rank < highs else "low"
        change = changes[index]
        lines.append(f"{rank + 1}. {lora_set.entries[index].name}: change {change:+.5f} ({band})")
    if not all(math.isfinite(c) for c in changes):
        lines.append("warning: a score is not finite (an image without any variation?)")
    return "\n".join(lines)
