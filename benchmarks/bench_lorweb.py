#!/usr/bin/env python
"""Benchmarks: the pack side by side with ComfyUI's own LoRA path, in one run (ratios of medians).

Run it with the Python that runs ComfyUI (it starts ComfyUI in this process, like scripts/run_analogy.py):

    python custom_nodes/comfyui-lorweb/benchmarks/bench_lorweb.py --comfyui . --json bench.json
    python benchmarks/bench_lorweb.py --comfyui ~/ComfyUI --device cuda          # on a GPU

Sections: apply (pack vs stock LoraLoaderModelOnly with an ordinary LoRA of the same rank K*r on the same
targets, on a Flux of real width with a few blocks), encode (Encode Analogy Pair vs three CLIPVisionEncode),
basis load (time and peak RSS against the file size; first and cached), sampling (seconds per step: base, ordinary
LoRA, analogy), scaling (the pack's own work for K and for layer counts, against this machine's matmul rate),
memory (factor sizes, re-runs). Random weights of the real shapes; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BENCH_DIR = Path(__file__).absolute().parent
PACK_DIR = BENCH_DIR.parent
sys.path.insert(0, str(PACK_DIR / "scripts"))
sys.path.insert(0, str(PACK_DIR))

from lorweb_demo import write_basis  # noqa: E402  (random bases in the released layout; no ComfyUI import)

HIDDEN = 3072
NUM_LORAS, RANK, KEYS_DIM, QUERY_DIM = 32, 4, 128, 3 * 768


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, default=PACK_DIR.parents[1], help="ComfyUI folder")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where models run")
    parser.add_argument("--double-blocks", type=int, default=2, help="Flux double blocks (real width)")
    parser.add_argument("--single-blocks", type=int, default=2, help="Flux single blocks (real width)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median)")
    parser.add_argument("--sample-steps", type=int, default=3)
    parser.add_argument(
        "--full-basis",
        action="store_true",
        help="basis-load section on the full released size (494 modules, ~1.7 GB); default: the "
        "modules of the benchmark's blocks",
    )
    parser.add_argument(
        "--only",
        nargs="*",
        help="sections to run in this process (apply encode_pack encode_stock "
        "load sample scale memory); default: each in its own process",
    )
    parser.add_argument("--sections", nargs="*", help="run only these sections (each in its own process)")
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args(argv)


def median_seconds(run: Callable[[], object], repeats: int, setup: Callable[[], object] | None = None) -> float:
    """Median wall time of ``run`` over ``repeats`` (after one untimed warm-up), ``setup`` untimed before each."""
    times = []
    for index in range(repeats + 1):
        if setup:
            setup()
        gc.collect()
        start = time.perf_counter()
        run()
        _synchronize()
        if index:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ fixtures


def start(args) -> None:
    import comfy_harness

    comfy_harness.start_comfyui(args.comfyui.resolve(), cpu=args.device == "cpu")
    comfy_harness.load_nodes(comfy_harness.HeadlessServer(), packs={PACK_DIR: comfy_harness.PACK_NODE})


def module_names(double: int, single: int) -> list[str]:
    from lorweb_ops.flux_layout import released_module_names

    return released_module_names(depth=double, single_depth=single)


def write_ordinary_lora(path: Path, modules: list[str], rank: int) -> Path:
    """An ordinary diffusers-format LoRA of ``rank`` on the same modules (fp16, alpha = rank: scale 1)."""
    import torch
    from safetensors.torch import save_file

    from lorweb_ops.flux_layout import module_shape

    generator = torch.Generator().manual_seed(7)
    tensors = {}
    for name in modules:
        fan_in, fan_out = module_shape(name)
        prefix = f"transformer.{name}"
        tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=generator) / fan_in**0.5).half()
        tensors[f"{prefix}.lora_B.weight"] = (0.01 * torch.randn(fan_out, rank, generator=generator)).half()
        tensors[f"{prefix}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return path


def build_flux(args):
    """Flux of real width through ComfyUI's stock loader path (load_diffusion_model_state_dict)."""
    import comfy.sd
    import torch
    from lorweb_demo import flux_shapes, random_state

    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    state = random_state(flux_shapes(args.double_blocks, args.single_blocks), dtype, seed=1)
    model = comfy.sd.load_diffusion_model_state_dict(state)
    if model is None:
        raise SystemExit("ComfyUI did not detect the benchmark Flux")
    return model


def random_analogy(seed: int):
    import torch

    import lorweb_ops

    generator = torch.Generator().manual_seed(seed)
    return lorweb_ops.Analogy(torch.randn(1, QUERY_DIM, generator=generator), "cat-aa'b", {}, "random", 768)


# -------------------------------------------------------------------------------------------------- sections


def bench_apply(args, work: Path, model, results: dict) -> None:
    import comfy.model_management as mm
    import nodes

    import lorweb_ops

    modules = module_names(args.double_blocks, args.single_blocks)
    basis = lorweb_ops.load_basis(work / "basis.safetensors")
    lora_name = "ordinary_lora.safetensors"
    apply = nodes.NODE_CLASS_MAPPINGS["LoRWeB_ApplyBasis"]
    analogies = [random_analogy(1), random_analogy(2)]

    def stock():
        patched = nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora_name, 1.0)[0]
        mm.load_models_gpu([patched])

    def pack(analogy):
        patched = apply.execute(model, basis, analogy, 1.0).result[0]
        mm.load_models_gpu([patched])

    def pack_own_work(analogy):
        coefficients = lorweb_ops.mixing_coefficients(basis, analogy.query)
        lorweb_ops.composed_patches(basis, coefficients)

    def patching_only():
        mm.load_models_gpu([prepared["model"]])

    prepared = {}

    def prepare_patched():
        mm.unload_all_models()
        prepared["model"] = apply.execute(model, basis, analogies[0], 1.0).result[0]

    unload = mm.unload_all_models
    timings = {
        "stock_lora_loader": median_seconds(stock, args.repeats, unload),
        "pack_first_analogy": median_seconds(lambda: pack(analogies[0]), args.repeats, unload),
        "pack_new_analogy": median_seconds(lambda: pack(analogies[1]), args.repeats, unload),
        "pack_own_work": median_seconds(lambda: pack_own_work(analogies[1]), args.repeats),
        "comfyui_weight_patching": median_seconds(patching_only, args.repeats, prepare_patched),
    }
    unload()
    results["apply"] = {
        "seconds": timings,
        "targets": len(modules),
        "rank": NUM_LORAS * RANK,
        "ratio_first_vs_stock": timings["pack_first_analogy"] / timings["stock_lora_loader"],
        "ratio_new_vs_stock": timings["pack_new_analogy"] / timings["stock_lora_loader"],
        "own_work_vs_patching": timings["pack_own_work"] / timings["comfyui_weight_patching"],
    }


def bench_encode(args, work: Path, results: dict, side: str) -> None:
    """One side of the encode comparison: the pack's Encode node, or three stock CLIPVisionEncode runs.

    The two sides run in separate processes: on the CPU, ComfyUI's CLIP vision keeps about 1.5 GB per encode call
    (both versions, fp16 and fp32, measured here), so one process doing both would run out of memory.
    """
    import comfy.clip_vision
    import nodes
    import torch
    from lorweb_demo import write_clip_vision

    path = work / "clip_vision.safetensors"
    write_clip_vision(path)
    clip_vision = comfy.clip_vision.load(str(path))
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(1, 384, 384, 3, generator=generator) for _ in range(3)]
    encode = nodes.NODE_CLASS_MAPPINGS["LoRWeB_EncodeAnalogy"]
    stock_node = nodes.NODE_CLASS_MAPPINGS["CLIPVisionEncode"]

    def stock():
        for image in images:
            _run_node(stock_node, clip_vision=clip_vision, image=image, crop="center")

    run = stock if side == "stock" else (lambda: encode.execute(clip_vision, *images))
    seconds = median_seconds(run, ENCODE_REPEATS)
    key = "stock_clip_vision_encode_x3" if side == "stock" else "pack_encode_analogy"
    section = results.setdefault("encode", {"seconds": {}, "image_size": [384, 384], "repeats": ENCODE_REPEATS})
    section["seconds"][key] = seconds


ENCODE_REPEATS = 2


def bench_encode_pack(args, work: Path, results: dict) -> None:
    bench_encode(args, work, results, "pack")


def bench_encode_stock(args, work: Path, results: dict) -> None:
    bench_encode(args, work, results, "stock")


def _run_node(node_class, **inputs):
    """Run a stock node of either API generation (V3 classmethod execute, or V1 FUNCTION on an instance)."""
    if hasattr(node_class, "FUNCTION") and not hasattr(node_class, "define_schema"):
        return getattr(node_class(), node_class.FUNCTION)(**inputs)
    return node_class.execute(**inputs)


def bench_load(args, work: Path, results: dict) -> None:
    """Basis load in a fresh process per repeat (first load from a warm page cache, then a cached load)."""
    import lorweb_ops.flux_layout as flux_layout

    modules = (
        flux_layout.released_module_names() if args.full_basis else module_names(args.double_blocks, args.single_blocks)
    )
    path = write_basis(work / "load_basis.safetensors", modules)
    size = path.stat().st_size
    runs = [
        json.loads(
            subprocess.run(
                [sys.executable, str(BENCH_DIR / "load_probe.py"), str(path)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        for _ in range(max(3, args.repeats // 2))
    ]
    first = statistics.median(r["first_seconds"] for r in runs)
    cached = statistics.median(r["cached_seconds"] for r in runs)
    peak = statistics.median(r["peak_rss_increase"] for r in runs)
    results["load"] = {
        "file_bytes": size,
        "modules": len(modules),
        "first_seconds": first,
        "cached_seconds": cached,
        "peak_rss_increase_bytes": peak,
        "peak_rss_vs_file": peak / size,
        "cached_vs_first": cached / first,
    }


def bench_sample(args, work: Path, model, results: dict) -> None:
    import comfy.model_management as mm
    import comfy.sample
    import nodes
    import torch

    import lorweb_ops

    basis = lorweb_ops.load_basis(work / "basis.safetensors")
    lora_name = "ordinary_lora.safetensors"
    apply = nodes.NODE_CLASS_MAPPINGS["LoRWeB_ApplyBasis"]
    variants = {
        "base": model,
        "ordinary_lora": nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora_name, 1.0)[0],
        "analogy": apply.execute(model, basis, random_analogy(1), 1.0).result[0],
    }
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 16, 32, 32, generator=generator)
    context = torch.randn(1, 16, 4096, generator=generator)
    positive = [
        [
            context,
            {
                "pooled_output": torch.randn(1, 768, generator=generator),
                "guidance": 2.5,
                "reference_latents": [latent.clone()],
            },
        ]
    ]
    negative = [[torch.zeros_like(context), {"pooled_output": torch.zeros(1, 768), "guidance": 2.5}]]
    noise = torch.randn(latent.shape, generator=generator)
    steps = args.sample_steps

    def sample(patched):
        comfy.sample.sample(
            patched, noise, steps, 1.0, "euler", "simple", positive, negative, latent, disable_pbar=True, seed=0
        )

    per_step = {}
    for name, patched in variants.items():
        mm.unload_all_models()
        mm.load_models_gpu([patched])
        per_step[name] = median_seconds(lambda p=patched: sample(p), args.repeats) / steps
    mm.unload_all_models()
    results["sample"] = {
        "seconds_per_step": per_step,
        "latent": [32, 32],
        "steps": steps,
        "ratio_analogy_vs_lora": per_step["analogy"] / per_step["ordinary_lora"],
    }


def bench_scale(args, work: Path, results: dict) -> None:
    """The pack's own work (coefficients + factor folding) for K and for layer counts; its arithmetic rate."""
    import torch

    import lorweb_ops

    def own_work_seconds(basis) -> float:
        query = random_analogy(3).query
        return median_seconds(
            lambda: lorweb_ops.composed_patches(basis, lorweb_ops.mixing_coefficients(basis, query)), args.repeats
        )

    def flops(basis) -> float:
        # per module: the query projection (Dk x Dq), the key scores (K x Dk), folding c into down (K*r*in)
        per = [
            2 * basis.keys_dim * basis.query_dim
            + 2 * basis.num_loras * basis.keys_dim
            + basis.num_loras * basis.rank * basis.weights[m].in_features
            for m in basis.modules
        ]
        return float(sum(per))

    by_k = {}
    modules = module_names(1, 1)
    for num_loras in (8, 16, 32, 64):
        basis = lorweb_ops.load_basis(write_basis(work / f"k{num_loras}.safetensors", modules, num_loras))
        seconds = own_work_seconds(basis)
        by_k[num_loras] = {"seconds": seconds, "gflop_per_s": flops(basis) / seconds / 1e9}
    by_layers = {}
    for double in (1, 2, 4, 8):
        basis = lorweb_ops.load_basis(write_basis(work / f"d{double}.safetensors", module_names(double, 0)))
        seconds = own_work_seconds(basis)
        by_layers[len(basis.modules)] = {"seconds": seconds, "gflop_per_s": flops(basis) / seconds / 1e9}
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    matmul = 2 * 2048**3 / median_seconds(lambda: a @ b, args.repeats) / 1e9
    results["scale"] = {
        "by_num_loras": by_k,
        "by_layers": by_layers,
        "matmul_gflop_per_s": matmul,
        "k_linearity": _slope_ratio(by_k),
        "layer_linearity": _slope_ratio(by_layers),
    }


def _slope_ratio(series: dict) -> float:
    """Seconds per unit at the largest size over seconds per unit at the smallest: 1.0 is perfectly linear."""
    sizes = sorted(series)
    return (series[sizes[-1]]["seconds"] / sizes[-1]) / (series[sizes[0]]["seconds"] / sizes[0])


def bench_memory(args, work: Path, model, results: dict) -> None:
    """Numbers held per composed analogy against K*r*(in+out) per target, and RSS over 20 alternating re-runs."""
    import comfy.model_management as mm
    import nodes
    import psutil

    import lorweb_ops

    basis = lorweb_ops.load_basis(work / "basis.safetensors")
    coefficients = lorweb_ops.mixing_coefficients(basis, random_analogy(1).query)
    patches = lorweb_ops.composed_patches(basis, coefficients)
    # ``up`` is a view of the basis: only ``down`` is new per analogy
    held = sum(
        p.down.numel()
        + (
            p.up.numel()
            if p.up.untyped_storage().data_ptr() != basis.weights[p.target.module].lora_B.untyped_storage().data_ptr()
            else 0
        )
        for p in patches
    )
    bound = sum(NUM_LORAS * RANK * (p.down.shape[1] + p.up.shape[0]) for p in patches)
    apply = nodes.NODE_CLASS_MAPPINGS["LoRWeB_ApplyBasis"]
    process = psutil.Process()
    rss = []
    for run in range(20):
        patched = apply.execute(model, basis, random_analogy(run % 2), 1.0).result[0]
        mm.load_models_gpu([patched])
        mm.unload_all_models()
        del patched
        gc.collect()
        rss.append(process.memory_info().rss)
    results["memory"] = {
        "numbers_held_per_analogy": held,
        "bound_kr_in_plus_out": bound,
        "held_vs_bound": held / bound,
        "rss_growth_runs_5_to_20": (rss[-1] - rss[4]) / rss[4],
    }


# ---------------------------------------------------------------------------------------------------- report

TARGETS = [
    ("apply: first analogy vs stock", ("apply", "ratio_first_vs_stock"), 1.05),
    ("apply: new analogy vs stock", ("apply", "ratio_new_vs_stock"), 1.05),
    ("pack's own work vs ComfyUI patching", ("apply", "own_work_vs_patching"), 0.10),
    ("encode vs 3x CLIPVisionEncode", ("encode", "ratio_vs_stock"), 1.10),
    ("basis load: peak RSS / file size", ("load", "peak_rss_vs_file"), 1.25),
    ("basis load: cached / first", ("load", "cached_vs_first"), 0.01),
    ("sampling: analogy vs ordinary LoRA", ("sample", "ratio_analogy_vs_lora"), 1.02),
    ("memory held / K*r*(in+out)", ("memory", "held_vs_bound"), 1.0),
    ("RSS growth over 20 re-runs", ("memory", "rss_growth_runs_5_to_20"), 0.05),
    ("scaling in K (per-K cost, 64 vs 8)", ("scale", "k_linearity"), 1.5),
    ("scaling in layers (per-layer cost, max vs min)", ("scale", "layer_linearity"), 1.5),
]


def report(results: dict) -> list[str]:
    lines = [f"{'measure':48} {'value':>10} {'target':>8}  ok"]
    for label, (section, key), limit in TARGETS:
        value = results.get(section, {}).get(key)
        if value is not None:
            verdict = "yes" if value <= limit else "NO"
            lines.append(f"{label:48} {value:10.4f} {'<= ' + format(limit, 'g'):>8}  {verdict}")
    return lines


SECTIONS = ("apply", "encode_pack", "encode_stock", "load", "sample", "scale", "memory")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.only is None:
        results = run_sections_apart(args.sections or SECTIONS, argv if argv is not None else sys.argv[1:])
    else:
        results = run_sections(args, set(args.only))
    for line in report(results):
        print(line)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def run_sections_apart(sections, argv: list[str]) -> dict:
    """Each section in a fresh process: its memory (and ComfyUI's caches) cannot spill into the next one."""
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="lorweb-bench-") as folder:
        for name in sections:
            out = Path(folder) / f"{name}.json"
            command = [
                sys.executable,
                str(Path(__file__).absolute()),
                *_without_options(argv),
                "--only",
                name,
                "--json",
                str(out),
            ]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            _merge(results, json.loads(out.read_text()))
    encode = results.get("encode", {}).get("seconds", {})
    if len(encode) == 2:
        results["encode"]["ratio_vs_stock"] = encode["pack_encode_analogy"] / encode["stock_clip_vision_encode_x3"]
    return results


def _merge(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _without_options(argv: list[str], options=("--json", "--sections")) -> list[str]:
    """The command line minus the options the parent handles (each with its values)."""
    cleaned, skipping = [], False
    for item in argv:
        if item.startswith("--"):
            skipping = item.split("=")[0] in options
        if not skipping:
            cleaned.append(item)
    return cleaned


def run_sections(args, sections: set[str]) -> dict:
    start(args)
    results: dict = {
        "device": args.device,
        "double_blocks": args.double_blocks,
        "single_blocks": args.single_blocks,
        "repeats": args.repeats,
        "torch_threads": _threads(),
    }
    with tempfile.TemporaryDirectory(prefix="lorweb-bench-") as folder:
        work = Path(folder)
        needs_model = sections & {"apply", "sample", "memory"}
        model = build_flux(args) if needs_model else None
        if needs_model and not (work / "basis.safetensors").exists():
            prepare_shared_files(args, work)
        for name in SECTIONS:
            if name not in sections:
                continue
            started = time.perf_counter()
            runner = globals()[f"bench_{name}"]
            runner(args, work, model, results) if name in ("apply", "sample", "memory") else runner(args, work, results)
            print(f"[{name}] {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return results


def prepare_shared_files(args, work: Path) -> None:
    """The basis and the ordinary LoRA of the same rank on the same targets, and the loras folder entry."""
    import folder_paths

    modules = module_names(args.double_blocks, args.single_blocks)
    write_basis(work / "basis.safetensors", modules)
    write_ordinary_lora(work / "ordinary_lora.safetensors", modules, NUM_LORAS * RANK)
    folder_paths.add_model_folder_path("loras", str(work))


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    raise SystemExit(main())
