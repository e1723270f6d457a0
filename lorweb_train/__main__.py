"""``accelerate launch -m lorweb_train --config train.yaml`` (several GPUs) or ``python -m lorweb_train ...``."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

import yaml

# the pack's root (for lorweb_ops and the ComfyUI glue) when run from elsewhere with -m
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from lorweb_ops.errors import LoRWeBError  # noqa: E402

from .config import load_config  # noqa: E402
from .stopping import TrainingStopped  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lorweb_train", description="Train or fine-tune a LoRWeB basis.")
    parser.add_argument("--config", required=True, help="training yaml (see docs/training.md)")
    parser.add_argument("--init", default="", help="an existing basis .safetensors to fine-tune (e.g. the released)")
    parser.add_argument("--resume", nargs="?", const="latest", default="", help="continue from a checkpoint")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.steps=100"
    )
    parser.add_argument(
        "--device", default="", help="cpu, cuda or cuda:N (default: the config's device, auto = CUDA when present)"
    )
    return parser.parse_args(argv)


def _refuse_another_runs_folder(output_dir: str) -> None:
    """A new run beside another run's checkpoints would prune them by name and mix the two on a later --resume."""
    checkpoints = os.path.join(output_dir, "checkpoints")
    if os.path.isdir(checkpoints) and any(n.startswith("step_") for n in os.listdir(checkpoints)):
        raise LoRWeBError(
            f"{output_dir} already holds another run's checkpoints ({checkpoints}). Continue that run with --resume, "
            "or start the new one in another output_dir."
        )


def _launcher() -> list[str]:
    """How this run was started: ``scripts/train_basis.py`` (from the ComfyUI folder, where ``-m lorweb_train``
    is not importable) or the package itself."""
    script = sys.argv[0] if sys.argv else ""
    if not script or os.path.basename(script) == "__main__.py":
        return ["python", "-m", "lorweb_train"]
    return ["python", script]


def _stopped_message(stopped: TrainingStopped, args: argparse.Namespace) -> str:
    """The command that continues the run: the same options (they shape the network and data), plus --resume."""
    words = [*_launcher(), "--config", args.config]
    words += ["--init", args.init] if args.init else []
    words += [w for item in args.set for w in ("--set", item)]
    words += ["--device", args.device] if args.device else []
    command = " ".join(shlex.quote(w) for w in [*words, "--resume"])
    return f"LoRWeB training: {stopped}. Continue the run with --resume (from the latest checkpoint): {command}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {}
    for item in args.set:
        key, separator, value = item.partition("=")
        if not separator:
            print(f"--set {item!r}: write KEY=VALUE, e.g. train.steps=100", file=sys.stderr)
            return 2
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            problem = str(getattr(error, "problem", "") or error)[:120]
            print(f"LoRWeB training: --set {item[:120]!r}: the value is not readable YAML ({problem}). "
                  "Quote it or write a plain number/word, e.g. train.steps=100.", file=sys.stderr)  # fmt: skip
            return 2
    if args.init:
        overrides["model.init"] = args.init
    if args.device:
        overrides["device"] = args.device
    try:
        config = load_config(args.config, overrides)
        if not args.resume:
            _refuse_another_runs_folder(config.output_dir)
        from .trainer import Trainer

        trainer = Trainer(config)
        state = trainer.accelerator.state
        trainer.accelerator.print(f"LoRWeB training on {state.num_processes} process(es), {state.distributed_type}")
        if args.resume:
            trainer.resume(None if args.resume == "latest" else args.resume)
        try:
            path = trainer.train()
        finally:
            trainer.close()
    except LoRWeBError as error:
        print(f"LoRWeB training: {error}", file=sys.stderr)
        return 2
    except TrainingStopped as stopped:
        if trainer.accelerator.is_main_process:
            print(_stopped_message(stopped, args), file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:  # Ctrl-C while the model loads: nothing trained yet, nothing to save
        return 130
    trainer.accelerator.print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
