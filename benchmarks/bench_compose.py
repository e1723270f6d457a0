#!/usr/bin/env python
"""Benchmark: composing N LoRAs over the steps (switch, composite, cmlora) against merge, in one run.

Run it with the Python that runs ComfyUI (it starts ComfyUI in this process, like bench_lorweb.py):

    python benchmarks/bench_compose.py --comfyui ~/ComfyUI --json compose.json
    python benchmarks/bench_compose.py --comfyui ~/ComfyUI --device cuda --double-blocks 19 --single-blocks 38

Per method and N = 2, 3, 4: wall time per step (median), model forwards per step counted by a wrapper around the
diffusion model (independent of the composition code), their ratios to merge, and the memory the composition holds
(cached contributions and LoRA factors). Also the cost of one full re-patch of the LoRA weights, which a per-step
switch through ComfyUI's weight patching would pay at every change. Random weights of the real width.

Section ``bypass`` (hosts with ``comfy.sd.load_bypass_lora_for_models``, ComfyUI 0.33; elsewhere it only reports that
the host lacks it): core's bypass LoRA against the pack's own hooks and merge for N LoRAs at fixed strengths, the
outputs compared, and a per-step switch expressed with core bypass through public APIs (one sampler call and one
model clone per step). ``--sections bypass`` runs it alone:

    python benchmarks/bench_compose.py --comfyui ~/ComfyUI --sections bypass --steps 4 --json bypass.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).absolute().parent
sys.path.insert(0, str(BENCH_DIR))

from bench_lorweb import build_flux, module_names, start, write_ordinary_lora  # noqa: E402

METHODS = ("merge", "switch", "composite", "cmlora", "cmlora_uncached")
SECTIONS = ("compose", "bypass")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, default=BENCH_DIR.parents[2], help="ComfyUI folder")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--double-blocks", type=int, default=1)
    parser.add_argument("--single-blocks", type=int, default=1)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--rank", type=int, default=16, help="rank of each ordinary LoRA")
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 = a 256 px image)")
    parser.add_argument("--counts", type=int, nargs="*", default=[2, 3, 4])
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats (median), after one warm-up")
    parser.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def median_seconds(run, repeats: int, setup=None, warm_up: bool = True) -> float:
    """Median wall time of ``run`` over ``repeats`` (after one untimed warm-up unless ``warm_up`` is False)."""
    times = []
    for index in range(repeats + int(warm_up)):
        if setup:
            setup()
        started = time.perf_counter()
        run()
        if index or not warm_up:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def compose_settings(method: str) -> dict:
    cache = "off" if method == "cmlora_uncached" else "non-uniform"
    return dict(
        method="cmlora" if method.startswith("cmlora") else method,
        tau=5,
        cache=cache,
        cache_interval=3,
        late_fraction=0.55,
        low_frequency_count=-1,
        reference_behaviour=False,
    )


def counted(model):
    """A clone whose diffusion-model calls are counted (a wrapper below the composition's hooks)."""
    import comfy.patcher_extension

    calls = []

    def count(executor, *args, **kwargs):
        calls.append(1)
        return executor(*args, **kwargs)

    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "bench_count", count)
    return clone, calls


def sampling_inputs(args):
    import torch

    generator = torch.Generator().manual_seed(0)
    latent = torch.zeros(1, 16, args.latent, args.latent)
    context = torch.randn(1, 16, 4096, generator=generator)
    positive = [[context, {"pooled_output": torch.randn(1, 768, generator=generator), "guidance": 2.5}]]
    noise = torch.randn(latent.shape, generator=generator)
    return latent, positive, noise


def repatch_seconds(model, lora_set) -> float:
    """One full re-patch of the LoRA weights (what every hook keyframe or LoRA change costs through patching)."""
    import comfy.model_management as mm
    import nodes

    compose = nodes.NODE_CLASS_MAPPINGS["LoRWeB_ComposeLoRASet"]
    merged = compose.execute(model, lora_set, **compose_settings("merge")).result[0]

    def patch():
        mm.load_models_gpu([merged], force_full_load=True)

    def unpatch():
        mm.unload_all_models()

    return median_seconds(patch, 3, setup=unpatch)


def run(args) -> dict:
    start(args)  # ComfyUI first: comfy.* is importable only once it is on sys.path with its arguments parsed
    import comfy.model_management as mm

    model = build_flux(args)
    inputs = sampling_inputs(args)
    results = {"steps": args.steps, "rank": args.rank, "latent": args.latent, "device": args.device}
    if "compose" in args.sections:
        bench_methods(args, model, inputs, results)
    if "bypass" in args.sections:
        import bench_bypass

        results["bypass"] = bench_bypass.bench_bypass(args, model, inputs)
    mm.unload_all_models()
    return results


def bench_methods(args, model, inputs, results: dict) -> None:
    """Every compose method for each N, with the same random LoRA N times (cost only)."""
    import nodes
    from safetensors.torch import load_file

    from lorweb_ops.compose import LoraSet, SetEntry

    with tempfile.TemporaryDirectory(prefix="lorweb-bench-compose-") as folder:
        lora_path = Path(folder) / "lora.safetensors"
        write_ordinary_lora(lora_path, module_names(args.double_blocks, args.single_blocks), args.rank)
        state = load_file(str(lora_path))
    compose = nodes.NODE_CLASS_MAPPINGS["LoRWeB_ComposeLoRASet"]
    results["runs"] = {}
    for count in args.counts:
        lora_set = LoraSet(tuple(SetEntry(f"lora{i}", "lora", 1.0, state=state) for i in range(count)), count - 1)
        for method in METHODS:
            composed = compose.execute(model, lora_set, **compose_settings(method)).result[0]
            seconds, forwards, _, _ = timed_sampling(composed, inputs, args.steps, args.repeats)
            results["runs"][f"{method}/N={count}"] = {
                "seconds_per_step": seconds,
                "forwards_per_step": forwards,
                "held_bytes": _held_bytes(composed),
            }
            print(f"{method:16s} N={count}: {seconds:.3f} s/step, {forwards:.2f} forwards/step", file=sys.stderr)
        results[f"repatch_seconds_N={count}"] = repatch_seconds(model, lora_set)
    results["one_forward_seconds"] = results["runs"][f"merge/N={args.counts[0]}"]["seconds_per_step"]


def sample_once(model, inputs, steps: int, **options):
    """One euler sampling at cfg 1 (``options``: start_step/last_step/... of ``comfy.sample.sample``)."""
    import comfy.sample

    latent, positive, noise = inputs
    latent = options.pop("latent", latent)
    noise = options.pop("noise", noise)
    sampler = ("euler", "simple")
    return comfy.sample.sample(model, noise, steps, 1.0, *sampler, positive, positive, latent, seed=0, **options)


def timed_sampling(model, inputs, steps: int, repeats: int):
    """(median s/step, forwards/step, the 1-step sample, the last timed sample).

    The untimed 1-step warm-up loads the model (and for merge patches it); with euler from the first sigma to 0
    its result is the model's denoised prediction itself, which the bypass section compares between paths.
    """
    import comfy.model_management as mm

    sampled, calls = counted(model)
    mm.unload_all_models()
    prediction = sample_once(sampled, inputs, 1)
    calls.clear()
    last = []
    seconds = median_seconds(lambda: last.append(sample_once(sampled, inputs, steps)), repeats, warm_up=False)
    return seconds / steps, len(calls) / repeats / steps, prediction, last[-1]


def _held_bytes(model) -> int:
    """Cached contributions and LoRA factors the composition wrapper holds after sampling."""
    import comfy.patcher_extension

    wrappers = model.wrappers.get(comfy.patcher_extension.WrappersMP.APPLY_MODEL, {})
    total = 0
    for items in wrappers.values():
        for runtime in items:
            factors = {id(t.up): t.up for terms in runtime.terms for t in terms}
            factors.update({id(t.down): t.down for terms in runtime.terms for t in terms})
            total += sum(f.numel() * f.element_size() for f in factors.values())
            if runtime.state is not None:
                total += runtime.state.combined.cache_bytes
    return total


def report(results: dict) -> list[str]:
    lines = report_methods(results) if "runs" in results else []
    if "bypass" in results:
        import bench_bypass

        lines += bench_bypass.report(results["bypass"])
    return lines


def report_methods(results: dict) -> list[str]:
    lines = ["| method | N | s/step | × merge | forwards/step | held MB |", "|---|---|---|---|---|---|"]
    for key, row in results["runs"].items():
        method, count = key.split("/N=")
        merge = results["runs"][f"merge/N={count}"]
        lines.append(
            f"| {method} | {count} | {row['seconds_per_step']:.3f} | "
            f"{row['seconds_per_step'] / merge['seconds_per_step']:.2f} | {row['forwards_per_step']:.2f} | "
            f"{row['held_bytes'] / 2**20:.1f} |"
        )
    for count in sorted({k.split("/N=")[1] for k in results["runs"]}):
        composite = results["runs"][f"composite/N={count}"]["seconds_per_step"]
        cmlora = results["runs"][f"cmlora/N={count}"]["seconds_per_step"]
        lines.append(f"N={count}: cmlora / composite = {cmlora / composite:.2f}")
        lines.append(
            f"N={count}: one full re-patch of the merged LoRAs = {results[f'repatch_seconds_N={count}']:.3f} s"
        )
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    results = run(args)
    results["total_seconds"] = time.perf_counter() - started
    for line in report(results):
        print(line)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
