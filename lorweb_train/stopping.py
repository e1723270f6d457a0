"""Ctrl-C and SIGTERM while training: recorded by a handler and acted on at the next step boundary.

A KeyboardInterrupt raised wherever the main thread happens to be can land between ``optimizer.step()`` and the
step counter (a checkpoint labelled step N would then hold step N+1's basis) or inside a save. The handlers here
only record the request; the loop stops after a finished step and writes a checkpoint of exactly that step.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

import torch

# SIGTERM is what batch schedulers (Slurm, Kubernetes, systemd) send before they kill a job
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class TrainingStopped(KeyboardInterrupt):
    """The run stopped on a signal after ``step``, with a complete checkpoint of that step.

    A KeyboardInterrupt, so that callers which treated Ctrl-C as one keep working."""

    def __init__(self, signum: int, step: int, checkpoint: os.PathLike | str) -> None:
        super().__init__(f"stopped by {signal_name(signum)} after step {step}; checkpoint {checkpoint}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def _say(text: str) -> None:
    """One line on stderr from a signal handler: os.write, because print can fail re-entering a buffered stream."""
    try:
        sys.stderr.flush()
        os.write(sys.stderr.fileno(), (text + "\n").encode())
    except (AttributeError, OSError, ValueError):  # stderr replaced by an object without a file descriptor
        print(text, file=sys.stderr)


class StopRequest:
    """Installs SIGINT/SIGTERM handlers for a ``with`` block (main thread only; restored afterwards).

    ``position()`` gives (the step the run will stop after, whether a checkpoint is being written)."""

    def __init__(self, position: Callable[[], tuple[int, bool]], announce: bool = True) -> None:
        self.signum: int | None = None
        self._position = position
        self._announce = announce
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread set them
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        step, saving = self._position()
        if self.signum is None:
            self.signum = signum
            self._tell(f"\n{signal_name(signum)}: stopping after step {step}: saving a checkpoint")
        elif saving:
            self._tell(
                f"\n{signal_name(signum)}: saving the checkpoint of step {step}; the run stops when it is written"
            )
        else:
            self._tell(
                f"\n{signal_name(signum)}: already stopping after step {step} (kill -9 stops without a checkpoint)"
            )

    def _tell(self, text: str) -> None:
        if self._announce:
            _say(text)

    def agreed(self, accelerator) -> int | None:
        """The signal to stop on, the same on every process (call at a step boundary, on every process).

        Each process gets its own signal at its own moment; summing the requests makes all of them stop after the
        same step, so the checkpoint's shards belong together."""
        if accelerator.num_processes == 1:
            return self.signum
        local = torch.zeros(len(STOP_SIGNALS), device=accelerator.device)
        if self.signum is not None:
            local[STOP_SIGNALS.index(self.signum)] = 1
        requested = accelerator.reduce(local, reduction="sum").tolist()
        if self.signum is not None:
            return self.signum
        return next((s for s, count in zip(STOP_SIGNALS, requested, strict=True) if count > 0), None)
