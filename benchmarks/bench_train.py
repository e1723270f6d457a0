#!/usr/bin/env python
"""Training benchmark: the LoRWeB trainer's step against ComfyUI's own TrainLoraNode, and 1 vs 2 processes.

Run it with the Python that runs ComfyUI (0.8.0 or newer has TrainLoraNode), with accelerate installed:

    python benchmarks/bench_train.py --comfyui ~/ComfyUI --json bench_train.json
    python benchmarks/bench_train.py --comfyui ~/ComfyUI --device cuda

Sections (each in its own process, so peak memory is per side):
  pack       seconds per training step and peak memory growth of lorweb_train (basis K*r = 128 on the block Linears,
             gradient checkpointing) on a Flux of real width (hidden 3072) with a few blocks, random weights;
  stock      the same for ComfyUI's TrainLoraNode training an ordinary LoRA of rank 128 (it adapts every weight of
             the model and adds bias adapters; it has no target option) on the same model and text, with the noise
             and reference latents side by side as one latent (it cannot take a Kontext reference latent);
  processes  lorweb_train on the tiny test Flux: seconds per step with 1 and with 2 CPU processes (accelerate).
Step times are medians (pack) or the difference of two runs of different lengths (stock, processes), so set-up
is not counted. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).absolute().parent
PACK_DIR = BENCH_DIR.parent
sys.path.insert(0, str(PACK_DIR / "scripts"))
sys.path.insert(0, str(PACK_DIR))
sys.path.insert(0, str(PACK_DIR / "tests"))

RANK = 128  # K * r of the released recipe (32 * 4)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, default=PACK_DIR.parents[1], help="ComfyUI folder")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--double-blocks", type=int, default=1)
    parser.add_argument("--single-blocks", type=int, default=1)
    parser.add_argument("--latent", type=int, default=16, help="latent grid side (pixels / 8)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per measurement")
    parser.add_argument("--text-tokens", type=int, default=32, help="T5 tokens (the reference trains with 512)")
    parser.add_argument(
        "--base-dtype", choices=["fp32", "bf16", "fp8"], help="frozen Flux weights (default: fp32 on cpu, bf16 on cuda)"
    )
    parser.add_argument("--sections", nargs="*", default=["pack", "stock", "processes"])
    parser.add_argument("--only", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


class RssSampler:
    """Peak resident memory above a starting mark, sampled every 5 ms in a thread (CPU runs)."""

    def __init__(self) -> None:
        import threading

        import psutil

        self.process, self.peak, self.running = psutil.Process(), 0, True
        self.mark = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return max(0, self.peak - self.mark)


# ------------------------------------------------------------------------------------------------ fixtures
def start(args) -> None:
    from comfy_harness import start_comfyui

    start_comfyui(args.comfyui.resolve(), cpu=args.device == "cpu", extra_args=[])


def build_flux(args):
    import comfy.sd
    import torch
    from lorweb_demo import flux_shapes, random_state

    base = args.base_dtype or ("fp32" if args.device == "cpu" else "bf16")
    dtype = torch.float32 if base == "fp32" else torch.bfloat16
    state = random_state(flux_shapes(args.double_blocks, args.single_blocks), dtype, seed=1)
    # the weights' dtype is asked for explicitly (ComfyUI would pick fp32 on a CPU); fp8: stored in fp8 and cast per
    # layer for the matmuls, as Load Diffusion Model's weight_dtype fp8_e4m3fn does
    options = {"dtype": {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[base]}
    return comfy.sd.load_diffusion_model_state_dict(state, model_options=options)


def inputs(args):
    """One batch of what both trainers see: target latents, Kontext reference latents, T5/CLIP-shaped text."""
    import torch

    generator = torch.Generator().manual_seed(0)
    side = args.latent
    latents = torch.randn(args.batch, 16, side, side, generator=generator)
    reference = torch.randn(args.batch, 16, side, side, generator=generator)
    context = torch.randn(1, args.text_tokens, 4096, generator=generator)
    pooled = torch.randn(1, 768, generator=generator)
    return latents, reference, context, pooled


def synchronize():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def memory_mark(device: str):
    """Start measuring: CUDA allocator peak on a GPU, sampled RSS on the CPU."""
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return RssSampler()


def memory_peak(device: str, mark) -> int:
    import torch

    return torch.cuda.max_memory_allocated() - mark if device == "cuda" else mark.stop()


# ------------------------------------------------------------------------------------------------ sections
def bench_pack(args, work: Path) -> dict:
    """lorweb_train's own step (Trainer.train_step) on ComfyUI's Flux through the ComfyUI glue."""
    import torch
    from PIL import Image

    from lorweb_train.backends.comfyui import backend_from_comfy
    from lorweb_train.config import config_from_mapping
    from lorweb_train.trainer import Trainer

    patcher = build_flux(args)
    latents, reference, context, pooled = inputs(args)
    size = args.latent * 4  # quadrant pixels: the grid is 2 quadrants of latent*8/2 pixels
    data = work / "data"
    for role in ("a", "a_prime", "b", "b_prime"):
        (data / role).mkdir(parents=True, exist_ok=True)
        for index in range(args.batch):
            Image.new("RGB", (size, size), (40 * index, 90, 30)).save(data / role / f"{index}.png")
    projection = torch.randn(768, 3, generator=torch.Generator().manual_seed(2))
    to_latent = torch.randn(16, 3, generator=torch.Generator().manual_seed(3))

    def encode_latents(images):  # the cache step is not timed: a fixed /8 projection stands in for the VAE
        pooled_pixels = torch.nn.functional.avg_pool2d(images.permute(0, 3, 1, 2), 8)
        return torch.einsum("oc,nchw->nohw", to_latent, pooled_pixels)

    backend = backend_from_comfy(
        patcher,
        torch.device(args.device),
        encode_text=lambda texts: (context.expand(len(texts), -1, -1), pooled.expand(len(texts), -1)),
        encode_latents=encode_latents,
        embed_images=lambda batch: batch.mean(dim=(1, 2)) @ projection.T,
    )
    config = config_from_mapping(
        {
            "output_dir": str(work / "out"),
            "data": {"path": str(data), "resolution": 8 * args.latent, "caption_dropout": 0.0},
            "train": {
                "batch_size": args.batch,
                "steps": 1000,
                "mixed_precision": "no" if args.device == "cpu" else "bf16",
                "optimizer": "adamw",
            },
        },
        "benchmark",
    )
    mark = memory_mark(args.device)  # from here: basis, optimiser states, activations (the model is loaded)
    trainer = Trainer(config, backend=backend)
    trainer.train_step()  # warm-up
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        trainer.train_step()
        synchronize()
        times.append(time.perf_counter() - start)
    peak = memory_peak(args.device, mark)
    parameters = sum(p.numel() for p in trainer.basis.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in backend.diffusion_model.parameters())
    trainer.close()
    return {"pack_step_s": statistics.median(times), "pack_peak_bytes": peak, "pack_parameters": parameters,
            "pack_model_bytes": model_bytes}  # fmt: skip


def bench_stock(args, work: Path) -> dict:
    """ComfyUI's TrainLoraNode, rank 128, same model, text and number of image tokens."""
    import nodes
    import torch

    if "TrainLoraNode" not in nodes.NODE_CLASS_MAPPINGS:
        import asyncio

        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    train_node = nodes.NODE_CLASS_MAPPINGS.get("TrainLoraNode")
    if train_node is None or not hasattr(train_node, "define_schema"):
        return {"stock_error": "this ComfyUI has no V3 TrainLoraNode (0.8.0 or newer needed)"}
    from lorweb_train.backends.comfyui import use_differentiable_rope

    restore = use_differentiable_rope()  # the same swap the pack's trainer needs; without it no backward at all
    patcher = build_flux(args)
    latents, reference, context, pooled = inputs(args)
    # 0.8.0's TrainLoraNode cannot take a Kontext reference latent (its process_cond_list iterates into the tensors
    # of a reference_latents list and fails), so it gets the same number of image tokens as one wider latent
    latents = torch.cat([latents, reference], dim=3)
    conditioning = [[context, {"pooled_output": pooled, "guidance": 1.0}]]
    dtype = "fp32" if args.device == "cpu" else "bf16"

    def run(steps: int) -> float:
        start = time.perf_counter()
        train_node.execute(
            [patcher], [{"samples": latents}], [conditioning], [args.batch], [steps], [1], [1e-4], [RANK],
            ["AdamW"], ["MSE"], [0], [dtype], [dtype], ["LoRA"], [True], ["[None]"], [False],
        )  # fmt: skip
        synchronize()
        return time.perf_counter() - start

    try:
        mark = memory_mark(args.device)  # from here: adapters, optimiser states, activations (the model is loaded)
        run(1)  # warm-up
        short = run(1)
        long = run(1 + args.steps)
        peak = memory_peak(args.device, mark)
    finally:
        restore()
    return {"stock_step_s": (long - short) / args.steps, "stock_peak_bytes": peak}


def bench_processes(args, work: Path) -> dict:
    """Tiny test Flux, global batch 8: seconds per step with 1 and 2 CPU processes (difference of two runs)."""
    import yaml
    from train_testing import training_config, write_quadruplets

    write_quadruplets(work / "data", 4, seed=1)
    results = {}
    for processes in (1, 2):
        seconds = {}
        for steps in (2, 2 + 2 * args.steps):
            config = training_config(
                work / f"p{processes}_{steps}",
                work / "data",
                data={"cache_dir": str(work / "cache")},
                train={"steps": steps, "batch_size": 8, "save_every": 10_000},
                model={"backend_options": {"seed": 0, "hidden": 64, "mlp": 128}},
            )
            path = work / f"train_{processes}_{steps}.yaml"
            path.write_text(yaml.safe_dump(config))
            launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                      "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m"]  # fmt: skip
            command = (launch if processes == 2 else [sys.executable, "-m"]) + ["lorweb_train", "--config", str(path)]
            env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
            env["PYTHONPATH"] = os.pathsep.join([str(PACK_DIR), str(PACK_DIR / "tests"), env.get("PYTHONPATH", "")])
            start = time.perf_counter()
            result = subprocess.run(command, env=env, capture_output=True, text=True)
            if result.returncode:
                raise SystemExit(result.stderr[-2000:])
            seconds[steps] = time.perf_counter() - start
        results[f"processes_{processes}_step_s"] = (seconds[2 + 2 * args.steps] - seconds[2]) / (2 * args.steps)
    return results


SECTIONS = {"pack": bench_pack, "stock": bench_stock, "processes": bench_processes}


def run_section(args) -> None:
    with tempfile.TemporaryDirectory() as folder:
        if args.only != "processes":
            start(args)
        result = SECTIONS[args.only](args, Path(folder))
    print("RESULT " + json.dumps(result), flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.only:
        run_section(args)
        return
    results = {"device": args.device, "batch": args.batch, "latent": args.latent,
               "blocks": [args.double_blocks, args.single_blocks]}  # fmt: skip
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    for section in args.sections:
        output = subprocess.run(
            [sys.executable, __file__, *forwarded, "--only", section], capture_output=True, text=True
        )
        line = next((x for x in output.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(output.stdout[-2000:], output.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"section {section} failed")
        results.update(json.loads(line[len("RESULT ") :]))
    if "pack_step_s" in results and "stock_step_s" in results:
        results["step_ratio_pack_over_stock"] = results["pack_step_s"] / results["stock_step_s"]
        results["memory_ratio_pack_over_stock"] = results["pack_peak_bytes"] / max(1, results["stock_peak_bytes"])
    if "processes_2_step_s" in results:
        results["speedup_2_processes"] = results["processes_1_step_s"] / results["processes_2_step_s"]
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
