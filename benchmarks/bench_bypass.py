"""The ``bypass`` section of bench_compose.py: core's bypass LoRA (ComfyUI 0.33) against the pack's own hooks.

``comfy.sd.load_bypass_lora_for_models`` returns a model clone whose LoRA layers are added on the activations at
one fixed strength per clone. This section measures what it can express next to the pack's paths, in one run:

* N LoRAs at fixed strengths: core bypass (the N LoRAs concatenated along the rank into one LoRA, because chained
  bypass loaders replace each other, see ``chained_check``), the pack's hook path with constant strengths
  (Scheduled LoRA Strength, start = end = 1: the same function), the pack's composite (N forwards, a different
  function: the mean of N single-LoRA predictions) and merge (ComfyUI's weight patching). Forwards per step are
  counted by a wrapper around the diffusion model; outputs are compared.
* a per-step switch (LoRA s mod N at step s) through public APIs only: one bypass clone per LoRA and one sampler
  call per step (what chained KSamplerAdvanced nodes do), against the pack's switch with tau = 1.
* what core bypass does with a diffusers-format Flux LoRA (q/k/v rows of the fused layers) and with fp8 weights.

Called from bench_compose.py after ComfyUI has started; ``comfy`` is imported inside the functions.
"""

from __future__ import annotations

import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_compose import compose_settings, counted, sample_once, timed_sampling
from bench_lorweb import module_names, write_ordinary_lora

STRENGTHS = (1.0, 0.75, 0.5, 1.25)  # distinct, so that a LoRA applied at the wrong strength shows in the checks
UP_SCALE = 0.02  # LoRA effect of a few per cent of each layer's output: large enough to compare paths


def bench_bypass(args, model, inputs) -> dict:
    import comfy.sd

    if not hasattr(comfy.sd, "load_bypass_lora_for_models"):
        print("bypass: this ComfyUI has no comfy.sd.load_bypass_lora_for_models; section skipped", file=sys.stderr)
        return {"available": False, "reason": "comfy.sd.load_bypass_lora_for_models is missing on this host"}
    states = [native_lora(model, args.rank, seed=10 + i) for i in range(max(args.counts))]
    base = sample_once(model, inputs, 1)
    results = {"available": True, "strengths": STRENGTHS, "runs": {}, "checks": {}, "switch": {}}
    for count in args.counts:
        runs, predictions = fixed_strength_runs(args, model, inputs, states[:count])
        results["runs"].update({f"{k}/N={count}": v for k, v in runs.items()})
        results["checks"][f"N={count}"] = compare(predictions, base)
        results["switch"][f"N={count}"] = per_step_switch(args, model, inputs, states[:count])
    results["chained"] = chained_check(model, inputs, states[:2], base)
    results["diffusers_format"] = diffusers_format_check(args, model, inputs, base)
    results["clone_seconds"] = clone_seconds(model, states[0])
    results["fp8"] = fp8_runs(args, inputs, states[:2])
    return results


# ------------------------------------------------------------------------------------------------------- LoRAs


def native_lora(model, rank: int, seed: int) -> dict:
    """A random Flux LoRA in ComfyUI's own key format on every 2-D weight of the blocks.

    Whole layers only (the fused qkv/linear1 as one layer): core bypass accepts only keys that name a whole weight,
    so this is the format all three paths apply in full.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, weight in model.model.diffusion_model.state_dict().items():
        if not (key.startswith(("double_blocks.", "single_blocks.")) and key.endswith(".weight") and weight.ndim == 2):
            continue
        name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
        fan_out, fan_in = weight.shape
        state[f"{name}.lora_down.weight"] = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
        state[f"{name}.lora_up.weight"] = UP_SCALE * torch.randn(fan_out, rank, generator=generator)
        state[f"{name}.alpha"] = torch.tensor(float(rank))
    return state


def concatenated(states: list[dict], strengths: tuple[float, ...]) -> dict:
    """N LoRAs at fixed strengths as one LoRA of the summed rank: sum_i s_i*(a_i/r_i)*up_i@down_i exactly.

    up = [s_i*(a_i/r_i)*up_i] side by side, down = [down_i] stacked, alpha = the summed rank (scale 1).
    """
    import torch

    out = {}
    for down_key in [k for k in states[0] if k.endswith(".lora_down.weight")]:
        name = down_key[: -len(".lora_down.weight")]
        downs = [s[down_key] for s in states]
        ups = [
            s[f"{name}.lora_up.weight"] * (strength * float(s[f"{name}.alpha"]) / s[down_key].shape[0])
            for s, strength in zip(states, strengths, strict=True)
        ]
        out[down_key] = torch.cat(downs, dim=0)
        out[f"{name}.lora_up.weight"] = torch.cat(ups, dim=1)
        out[f"{name}.alpha"] = torch.tensor(float(out[down_key].shape[0]))
    return out


def lora_set(states: list[dict], unit: bool = False):
    """The states at STRENGTHS (``unit``: at 1, for a state that already carries its strengths)."""
    from lorweb_ops.compose import LoraSet, SetEntry

    entries = tuple(SetEntry(f"lora{i}", "lora", 1.0 if unit else STRENGTHS[i], state=s) for i, s in enumerate(states))
    return LoraSet(entries, len(entries) - 1)


def core_bypass(model, state: dict, strength: float = 1.0):
    """The public entry point, model only (clip None), as LoraLoaderBypassModelOnly calls it."""
    import comfy.sd

    return comfy.sd.load_bypass_lora_for_models(model, None, state, strength, 0.0)[0]


def pack_model(model, states: list[dict], method: str, unit: bool = False, **overrides):
    import nodes

    if method == "constant":  # the pack's hook path, one pass with every LoRA at its strength
        node = nodes.NODE_CLASS_MAPPINGS["LoRWeB_ScheduledStrength"]
        return node.execute(model, lora_set(states, unit), 1.0, 1.0, "").result[0]
    node = nodes.NODE_CLASS_MAPPINGS["LoRWeB_ComposeLoRASet"]
    settings = {**compose_settings(method), **overrides}
    return node.execute(model, lora_set(states), **settings).result[0]


# ------------------------------------------------------------------------------------------------ measurements


def fixed_strength_runs(args, model, inputs, states: list[dict]) -> tuple[dict, dict]:
    """Cost and the first-step prediction of each path for N LoRAs at fixed strengths."""
    strengths = STRENGTHS[: len(states)]
    builders = {
        "core_bypass": lambda: core_bypass(model, concatenated(states, strengths)),
        "pack_hooks": lambda: pack_model(model, states, "constant"),
        # the same concatenated LoRA through the pack's hooks: separates the mechanism from the rank concatenation
        "pack_hooks_concat": lambda: pack_model(model, [concatenated(states, strengths)], "constant", unit=True),
        "pack_composite": lambda: pack_model(model, states, "composite"),
        "merge": lambda: pack_model(model, states, "merge"),
    }
    runs, predictions = {}, {}
    for name, build in builders.items():
        seconds, forwards, predictions[name], _ = timed_sampling(build(), inputs, args.steps, args.repeats)
        runs[name] = {"seconds_per_step": seconds, "forwards_per_step": forwards}
        print(f"bypass {name:15s} N={len(states)}: {seconds:.3f} s/step, {forwards:.2f} fwd/step", file=sys.stderr)
    return runs, predictions


def relative(a, b, reference) -> float:
    return float((a - b).abs().max() / reference.abs().max())


def compare(predictions: dict, base) -> dict:
    """Max abs differences relative to the output scale and to the LoRAs' effect (merge - no LoRA)."""
    merge = predictions["merge"]
    effect = merge - base
    pairs = {"core_vs_pack": ("core_bypass", "pack_hooks"), "core_vs_merge": ("core_bypass", "merge")}
    pairs["pack_vs_merge"] = ("pack_hooks", "merge")
    checks = {"effect_vs_output": float(effect.abs().max() / merge.abs().max())}
    for label, (a, b) in pairs.items():
        checks[f"{label}_vs_output"] = relative(predictions[a], predictions[b], merge)
        checks[f"{label}_vs_effect"] = relative(predictions[a], predictions[b], effect)
    return checks


def chained_check(model, inputs, states: list[dict], base) -> dict:
    """Two bypass loaders in a row (LoRA 0, then LoRA 1): which LoRAs does the result apply?"""
    first = core_bypass(model, states[0], STRENGTHS[0])
    chained = core_bypass(first, states[1], STRENGTHS[1])
    only_second = core_bypass(model, states[1], STRENGTHS[1])
    both = core_bypass(model, concatenated(states, STRENGTHS[:2]))
    outputs = {name: sample_once(m, inputs, 1) for name, m in (("chained", chained), ("second", only_second))}
    outputs["both"] = sample_once(both, inputs, 1)
    effect = outputs["both"] - base
    return {
        "injection_keys": sorted(chained.injections),
        "injections_per_key": {k: len(v) for k, v in chained.injections.items()},
        "chained_vs_both_vs_effect": relative(outputs["chained"], outputs["both"], effect),
        "chained_vs_second_only_vs_effect": relative(outputs["chained"], outputs["second"], effect),
    }


class _Counter(logging.Handler):
    """Counts ComfyUI's warnings about LoRA keys core bypass did not apply."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.dropped += "not in model state_dict" in record.getMessage()


def diffusers_format_check(args, model, inputs, base) -> dict:
    """A diffusers-format Flux LoRA (to_q/to_k/to_v = rows of the fused qkv/linear1): how much of it bypass applies."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="lorweb-bench-bypass-") as folder:
        path = Path(folder) / "diffusers.safetensors"
        write_ordinary_lora(path, module_names(args.double_blocks, args.single_blocks), args.rank)
        state = load_file(str(path))
    counter = _Counter()
    logging.getLogger().addHandler(counter)
    try:
        bypassed = core_bypass(model, state)
    finally:
        logging.getLogger().removeHandler(counter)
    merged = pack_model(model, [state], "merge")
    hooks = pack_model(model, [state], "constant")
    outputs = {name: sample_once(m, inputs, 1) for name, m in (("bypass", bypassed), ("merge", merged))}
    outputs["pack"] = sample_once(hooks, inputs, 1)
    effect = outputs["merge"] - base
    return {
        "lora_layers": sum(k.endswith(".lora_A.weight") for k in state),
        "dropped_by_bypass": counter.dropped,
        "bypass_vs_merge_vs_effect": relative(outputs["bypass"], outputs["merge"], effect),
        "pack_vs_merge_vs_effect": relative(outputs["pack"], outputs["merge"], effect),
    }


def per_step_switch(args, model, inputs, states: list[dict]) -> dict:
    """LoRA s mod N at step s with core bypass: one clone per LoRA, one sampler call per step (public APIs only),
    against the pack's switch with tau = 1 (one sampler call, hooks switched inside it)."""
    clones = [counted(core_bypass(model, s, STRENGTHS[i])) for i, s in enumerate(states)]
    started = time.perf_counter()
    segmented = segmented_sampling([m for m, _ in clones], inputs, args.steps)
    seconds = (time.perf_counter() - started) / args.steps
    forwards = sum(len(calls) for _, calls in clones) / args.steps
    pack = pack_model(model, states, "switch", tau=1)
    pack_seconds, pack_forwards, _, pack_final = timed_sampling(pack, inputs, args.steps, args.repeats)
    print(f"bypass switch N={len(states)}: core {seconds:.3f} s/step, pack {pack_seconds:.3f} s/step", file=sys.stderr)
    return {
        "core_seconds_per_step": seconds,
        "core_forwards_per_step": forwards,
        "pack_seconds_per_step": pack_seconds,
        "pack_forwards_per_step": pack_forwards,
        "core_vs_pack_vs_output": relative(segmented, pack_final, pack_final),
    }


def fp8_runs(args, inputs, states: list[dict]) -> dict:
    """N = 2 on the same Flux stored as float8_e4m3fn (ComfyUI casts each layer for the forward)."""
    import comfy.model_management as mm
    import comfy.sd
    import torch
    from lorweb_demo import flux_shapes, random_state

    mm.unload_all_models()
    state = random_state(flux_shapes(args.double_blocks, args.single_blocks), torch.float32, seed=1)  # build_flux's
    model = comfy.sd.load_diffusion_model_state_dict(state, model_options={"dtype": torch.float8_e4m3fn})
    del state
    base = sample_once(model, inputs, 1)
    runs, predictions = fixed_strength_runs(args, model, inputs, states)
    mm.unload_all_models()
    return {"runs": runs, "checks": compare(predictions, base)}


def segmented_sampling(models: list, inputs, steps: int):
    """Step s sampled alone with models[s mod N], as a chain of KSamplerAdvanced nodes would: noise added at the
    first call only, the last call denoises fully. Exact for euler (no sampler history crosses steps)."""
    import torch

    latent, _, noise = inputs
    for step in range(steps):
        options = {"start_step": step, "last_step": step + 1, "force_full_denoise": step == steps - 1}
        if step:
            options.update(latent=latent, noise=torch.zeros_like(noise))
        latent = sample_once(models[step % len(models)], inputs, steps, **options)
    return latent


def clone_seconds(model, state: dict) -> float:
    """One ``load_bypass_lora_for_models`` call: the price of a new strength (a new clone) at a step."""
    times = []
    for _ in range(3):
        started = time.perf_counter()
        core_bypass(model, state, 0.5)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------------- report


def report(results: dict) -> list[str]:
    if not results.get("available"):
        return [f"bypass: {results.get('reason')}"]
    lines = ["| path (bypass section) | N | s/step | × merge | forwards/step |", "|---|---|---|---|---|"]
    for key, row in results["runs"].items():
        path, count = key.split("/N=")
        merge = results["runs"][f"merge/N={count}"]["seconds_per_step"]
        lines.append(
            f"| {path} | {count} | {row['seconds_per_step']:.3f} | {row['seconds_per_step'] / merge:.2f} | "
            f"{row['forwards_per_step']:.2f} |"
        )
    for count, checks in results["checks"].items():
        lines.append(f"{count}: " + ", ".join(f"{k} {v:.1e}" for k, v in checks.items()))
    for count, row in results["switch"].items():
        lines.append(f"switch {count}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()))
    lines.append(f"chained bypass loaders: {results['chained']}")
    lines.append(f"diffusers-format LoRA: {results['diffusers_format']}")
    lines.append(f"one load_bypass_lora_for_models call: {results['clone_seconds']:.3f} s")
    for path, row in results["fp8"]["runs"].items():
        lines.append(f"fp8 N=2 {path}: {row['seconds_per_step']:.3f} s/step, {row['forwards_per_step']:.2f} fwd/step")
    lines.append("fp8 N=2: " + ", ".join(f"{k} {v:.1e}" for k, v in results["fp8"]["checks"].items()))
    return lines
