#!/usr/bin/env python
"""Benchmark: composing N LoRAs over the steps (switch, composite, cmlora) against merge, in one run.

Run it with the Python that runs ComfyUI (it starts ComfyUI in this process, like bench_lorweb.py):

    python benchmarks/bench_compose.py --comfyui ~/ComfyUI --json compose.json
    python benchmarks/bench_compose.py --comfyui ~/ComfyUI --device cuda --double-blocks 19 --single-blocks 38

Per method and N = 2, 3, 4: wall time per step (median), model forwards per step counted by a wrapper around the
diffusion model (independent of the composition code), their ratios to merge, and the memory the composition holds
(cached contributions and LoRA factors). Also the cost of one full re-patch of the LoRA weights, which a per-step
switch through ComfyUI's weight patching would pay at every change. Random weights of the real width.
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
    import comfy.sample
    from safetensors.torch import load_file

    import nodes
    from lorweb_ops.compose import LoraSet, SetEntry

    model = build_flux(args)
    with tempfile.TemporaryDirectory(prefix="lorweb-bench-compose-") as folder:
        lora_path = Path(folder) / "lora.safetensors"
        write_ordinary_lora(lora_path, module_names(args.double_blocks, args.single_blocks), args.rank)
        state = load_file(str(lora_path))
    latent, positive, noise = sampling_inputs(args)
    compose = nodes.NODE_CLASS_MAPPINGS["LoRWeB_ComposeLoRASet"]
    results = {"steps": args.steps, "rank": args.rank, "latent": args.latent, "device": args.device, "runs": {}}
    for count in args.counts:
        lora_set = LoraSet(tuple(SetEntry(f"lora{i}", "lora", 1.0, state=state) for i in range(count)), count - 1)
        for method in METHODS:
            composed = compose.execute(model, lora_set, **compose_settings(method)).result[0]
            sampled, calls = counted(composed)

            def sample(m=sampled, steps=args.steps):
                comfy.sample.sample(m, noise, steps, 1.0, "euler", "simple", positive, positive, latent, seed=0)

            mm.unload_all_models()
            sample(steps=1)  # warm-up: loads (and for merge patches) the model, untimed
            calls.clear()
            seconds = median_seconds(sample, args.repeats, warm_up=False) / args.steps
            forwards = len(calls) / args.repeats / args.steps
            results["runs"][f"{method}/N={count}"] = {
                "seconds_per_step": seconds,
                "forwards_per_step": forwards,
                "held_bytes": _held_bytes(composed),
            }
            print(f"{method:16s} N={count}: {seconds:.3f} s/step, {forwards:.2f} forwards/step", file=sys.stderr)
        results[f"repatch_seconds_N={count}"] = repatch_seconds(model, lora_set)
    mm.unload_all_models()
    one_forward = results["runs"][f"merge/N={args.counts[0]}"]["seconds_per_step"]
    results["one_forward_seconds"] = one_forward
    return results


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
                total += runtime.state.cache_bytes
    return total


def report(results: dict) -> list[str]:
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
