#!/usr/bin/env python
"""Train or fine-tune a LoRWeB basis: the trainer's command, run from the ComfyUI folder with ComfyUI's Python.

    python custom_nodes/comfyui-lorweb/scripts/train_basis.py --config my_train.yaml
    python custom_nodes/comfyui-lorweb/scripts/train_basis.py --config my_train.yaml \
        --init models/lorweb/lorweb_model.safetensors
    accelerate launch --multi_gpu --num_processes 4 custom_nodes/comfyui-lorweb/scripts/train_basis.py \
        --config my_train.yaml

    python custom_nodes/comfyui-lorweb/scripts/train_basis.py --demo

The options are the trainer's (``--config``, ``--init``, ``--resume``, ``--set``, ``--device``; see
docs/training.md). ``--demo`` trains a few steps on generated before/after pairs with the demo's random weights
(``run_analogy.py --demo`` writes the same files) on the CPU, and puts the basis where ``run_analogy.py --demo
--basis lorweb_demo_trained.safetensors`` applies it: a smoke test of the whole trainer, not a useful basis.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).absolute().parent
PACK_DIR = SCRIPTS.parent
for _folder in (str(PACK_DIR), str(SCRIPTS)):
    if _folder not in sys.path:
        sys.path.append(_folder)  # appended, as the pack's __init__.py does: one import identity

EXAMPLE_CONFIG = PACK_DIR / "training" / "train_example.yaml"
DEMO_NAME = "lorweb_demo_trained"
DEMO_INSTRUCTION = "Make it blue."
#: (shape, colour before) of the demo's pairs; after = the same shape in blue, as the runner demo's analogy
DEMO_PAIRS = (("circle", "red"), ("square", "red"), ("circle", "green"), ("square", "yellow"))
#: the demo run: the example config at toy size on the demo's files (K = 4, rank 2, 64 px grids, 3 steps)
DEMO_SETTINGS = {
    "name": DEMO_NAME,
    "device": "cpu",
    "data": {"resolution": 64, "layout": "pairs"},
    "network": {"num_loras": 4, "rank": 2, "keys_dim": 16},
    "train": {
        "batch_size": 2,
        "steps": 3,
        "save_every": 3,
        "optimizer": "adamw",
        "mixed_precision": "no",
    },
    # the demo Flux is stored in fp8 as a user's fp8 Kontext is; CLIP-L alone stands in for the T5-XXL, whose
    # full-size demo file takes minutes per prompt on a CPU
    "model": {"weight_dtype": "fp8_e4m3fn", "backend_options": {"text_encoders": "clip_l"}},
}


def parse_demo_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train_basis.py --demo", description="The trainer's smoke run.")
    parser.add_argument("--demo", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("lorweb-train-demo"), help="output folder (and its data)")
    parser.add_argument("--demo-cache", type=Path, help="folder of the demo weights (default ~/.cache/lorweb-demo)")
    parser.add_argument("--steps", type=int, default=DEMO_SETTINGS["train"]["steps"], help="training steps")
    return parser.parse_args(argv)


def write_demo_pairs(folder: Path) -> None:
    """Before/after pairs of the runner demo's kind (a shape turned blue), as a metadata.jsonl pairs layout."""
    from lorweb_demo import demo_shape

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (shape, colour) in enumerate(DEMO_PAIRS):
        before, after = f"{index}_{shape}_{colour}.png", f"{index}_{shape}_blue.png"
        demo_shape(shape, colour).save(folder / before)
        demo_shape(shape, "blue").save(folder / after)
        lines.append(json.dumps({"a": before, "a_prime": after, "instruction": DEMO_INSTRUCTION}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def demo_config(out: Path, steps: int) -> Path:
    """The example config with the demo's settings, written beside the run (a config the user can read)."""
    import yaml

    document = yaml.safe_load(EXAMPLE_CONFIG.read_text(encoding="utf-8"))
    for key, value in DEMO_SETTINGS.items():
        if isinstance(value, dict):
            document[key].update(value)
        else:
            document[key] = value
    document["train"]["steps"] = document["train"]["save_every"] = steps
    document["output_dir"] = str(out.absolute())
    document["data"]["path"] = str((out / "data").absolute())
    path = out / "train_demo.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def prepare_demo_files(cache: Path | None) -> Path:
    """The demo weights under the templates' names, found first by ComfyUI's model folders in this process."""
    import lorweb_demo

    from lorweb_train.backends.comfyui import comfy_on_cpu, ensure_comfy

    ensure_comfy()
    comfy_on_cpu()
    cache = cache or lorweb_demo.default_cache()
    lorweb_demo.ensure_demo_files(cache)
    lorweb_demo.register_demo_folders(cache)
    return cache


def run_demo(argv: list[str]) -> int:
    from lorweb_ops.files import write_whole
    from lorweb_train.__main__ import main

    args = parse_demo_args(argv)
    if args.steps < 1:
        print("train_basis.py --demo: --steps must be at least 1.", file=sys.stderr)
        return 2
    started = time.perf_counter()
    cache = prepare_demo_files(args.demo_cache)
    if (args.out / "checkpoints").is_dir():  # a rerun starts afresh: the demo's own folder, never the user's
        shutil.rmtree(args.out / "checkpoints")
    write_demo_pairs(args.out / "data")
    code = main(["--config", str(demo_config(args.out, args.steps))])
    if code:
        return code
    lorweb = cache / "lorweb"  # where run_analogy.py --demo finds it, with its mixing settings as <stem>.yaml

    def copy_of(name: str):  # whole or not at all: a runner reading the shared demo cache never sees half a file
        return lambda partial: shutil.copyfile(args.out / name, partial)

    write_whole(lorweb / f"{DEMO_NAME}.safetensors", copy_of(f"{DEMO_NAME}.safetensors"))
    write_whole(lorweb / f"{DEMO_NAME}.yaml", copy_of("config.yaml"))
    cache_option = f" --demo-cache {args.demo_cache}" if args.demo_cache else ""
    print(
        f"demo: trained {args.steps} steps in {time.perf_counter() - started:.0f} s; basis copied to "
        f"{lorweb / DEMO_NAME}.safetensors. Apply it in ComfyUI with:\n"
        f"  python {SCRIPTS / 'run_analogy.py'} --demo{cache_option} --basis {DEMO_NAME}.safetensors"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--demo" in argv:
        return run_demo(argv)
    from lorweb_train.__main__ import main as train

    return train(argv)


if __name__ == "__main__":
    sys.exit(main())
