"""Stopping a run with SIGINT / SIGTERM and continuing it with ``--resume``: the result is the uninterrupted run's.

Each run is the CLI in its own process (``python -m lorweb_train``) on the tiny test backend. The signals land at
exact moments through the test backend's hook (``train_testing.install_signal_hook``): right after an optimiser
step (before the step counter moves), in a model forward, and from outside while a checkpoint is being written.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_testing import SIGNAL_HOOK, environment_with_paths, training_config, write_quadruplets

from lorweb_train.stopping import StopRequest

STEPS, SAVE_EVERY = 6, 2


def cli(tmp: Path, config: dict, *args: str, hook: str = "") -> subprocess.Popen:
    """``python -m lorweb_train --config <tmp>/train.yaml ARGS`` started (CPU, one thread), stdout/stderr piped."""
    path = tmp / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    env = environment_with_paths() | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop(SIGNAL_HOOK, None)
    if hook:
        env[SIGNAL_HOOK] = hook
    command = [sys.executable, "-m", "lorweb_train", "--config", str(path), *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: int = 180) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr


def config_in(tmp: Path, shared: Path) -> dict:
    sections = {"data": {"cache_dir": str(shared / "cache")}, "train": {"steps": STEPS, "save_every": SAVE_EVERY}}
    return training_config(tmp, shared / "data", **sections)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, Path]:
    """The uninterrupted run's output folder, and the folder of the data and cache every run shares."""
    shared = tmp_path_factory.mktemp("shared")
    write_quadruplets(shared / "data", 4, seed=1)
    tmp = tmp_path_factory.mktemp("straight")
    code, stderr = finish(cli(tmp, config_in(tmp, shared)))
    assert code == 0, stderr[-3000:]
    return tmp / "out", shared


def checkpoint_steps(out: Path) -> list[int]:
    """The steps of the checkpoint folders; each must be complete (no .tmp, every file readable, its step)."""
    steps = []
    for folder in sorted((out / "checkpoints").iterdir()):
        assert not folder.name.endswith(".tmp"), f"a half-written checkpoint was left: {folder}"
        state = json.loads((folder / "trainer_state.json").read_text())
        assert folder.name == f"step_{state['step']:08d}"
        assert load_file(str(folder / "model.safetensors"))
        for name in ("optimizer.bin", "scheduler.bin"):
            torch.load(folder / name, weights_only=False)
        steps.append(state["step"])
    return steps


def assert_same_basis(a: Path, b: Path) -> None:
    first, second = load_file(str(a)), load_file(str(b))
    assert first.keys() == second.keys()
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def assert_stopped(code: int, stderr: str, signum: int, step: int) -> None:
    name = signal.Signals(signum).name
    assert code == 128 + signum, stderr[-3000:]  # 130 for SIGINT, 143 for SIGTERM
    assert stderr.count(f"{name}: stopping after step {step}: saving a checkpoint") == 1, stderr[-3000:]
    assert f"stopped by {name} after step {step}" in stderr and "Continue the run with --resume" in stderr
    assert "--resume" in stderr.strip().splitlines()[-1] and "Traceback" not in stderr, stderr[-3000:]


def resume_and_compare(tmp: Path, config: dict, straight_out: Path) -> None:
    code, stderr = finish(cli(tmp, config, "--resume"))
    assert code == 0, stderr[-3000:]
    assert_same_basis(straight_out / "tiny_basis.safetensors", tmp / "out" / "tiny_basis.safetensors")
    last = f"step_{STEPS:08d}"
    losses = [json.loads((o / "checkpoints" / last / "trainer_state.json").read_text())["losses"]
              for o in (straight_out, tmp / "out")]  # fmt: skip
    assert losses[0] == losses[1]  # the same numbers, not just close
    checkpoint_steps(tmp / "out")


# ------------------------------------------------------------------------------------------------ inside the process
@pytest.mark.parametrize(
    "hook, signum, stop_step, checkpoints",
    [
        # the user's case: the signal lands between optimizer.step() and the step counter (was: step 3's basis
        # saved as step 2, over the good step 2 checkpoint)
        ("optimizer:3:INT", signal.SIGINT, 3, [2, 3]),
        ("forward:3:TERM", signal.SIGTERM, 3, [2, 3]),  # mid-forward of step 3
        ("optimizer:4:TERM", signal.SIGTERM, 4, [2, 4]),  # step 4's checkpoint is due anyway: written once
    ],
)
def test_a_signal_mid_step_stops_after_it_and_resume_is_exact(tmp_path, straight, hook, signum, stop_step, checkpoints):
    straight_out, shared = straight
    config = config_in(tmp_path, shared)
    code, stderr = finish(cli(tmp_path, config, hook=hook))
    assert_stopped(code, stderr, signum, stop_step)
    assert checkpoint_steps(tmp_path / "out") == checkpoints
    resume_and_compare(tmp_path, config, straight_out)


# ------------------------------------------------------------------------------------------------ during a save
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signals_during_a_save_wait_for_it_and_resume_is_exact(tmp_path, straight, signum):
    """The save of step 2 is held open (the test hook) while the test sends the signal and a second SIGINT."""
    straight_out, shared = straight
    config = config_in(tmp_path, shared)
    process = cli(tmp_path, config, hook=f"save:1:{tmp_path}")
    deadline = time.monotonic() + 120
    while not (tmp_path / "saving").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.02)
    assert (tmp_path / "out" / "checkpoints" / "step_00000002.tmp").is_dir()  # caught mid-save
    process.send_signal(signum)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)  # an impatient second Ctrl-C
    time.sleep(0.3)
    (tmp_path / "sent").write_text("")
    code, stderr = finish(process)
    assert_stopped(code, stderr, signum, 2)
    assert "SIGINT: saving the checkpoint of step 2; the run stops when it is written" in stderr, stderr[-3000:]
    assert checkpoint_steps(tmp_path / "out") == [2]
    resume_and_compare(tmp_path, config, straight_out)


# ------------------------------------------------------------------------------------------------ damaged checkpoints
def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def damage(folder: Path, how: str) -> None:
    if how == "model":
        truncate(folder / "model.safetensors")
    elif how == "optimizer":
        truncate(folder / "optimizer.bin")
    elif how == "optimizer-content":  # a whole archive that is no optimiser state: only loading it tells
        torch.save({"something": "else"}, folder / "optimizer.bin")
    elif how == "state-not-json":
        (folder / "trainer_state.json").write_text('{"step": 4, "losses": [')
    elif how == "state-no-step":
        (folder / "trainer_state.json").write_text('{"losses": []}')


@pytest.mark.parametrize("how", ["model", "optimizer", "optimizer-content", "state-not-json", "state-no-step"])
@pytest.mark.parametrize("latest", [True, False], ids=["latest", "explicit"])
def test_a_damaged_checkpoint_is_a_message_naming_the_earlier_one(tmp_path, straight, how, latest):
    straight_out, shared = straight
    shutil.copytree(straight_out, tmp_path / "out")
    newest = tmp_path / "out" / "checkpoints" / f"step_{STEPS:08d}"
    damage(newest, how)
    code, stderr = finish(cli(tmp_path, config_in(tmp_path, shared), "--resume", *([] if latest else [str(newest)])))
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    which = "the newest checkpoint" if latest else "checkpoint"
    assert f"LoRWeB training: {which} {newest} is damaged" in stderr, stderr[-3000:]
    earlier = tmp_path / "out" / "checkpoints" / f"step_{STEPS - SAVE_EVERY:08d}"
    assert f"Resume from the earlier complete checkpoint: --resume {earlier}, or start again" in stderr


# ------------------------------------------------------------------------------------------------ units
class FakeAccelerator:
    """Two processes: ``reduce`` adds the other process's request to this one's."""

    num_processes, device = 2, torch.device("cpu")

    def __init__(self, other: list[float]) -> None:
        self.other = torch.tensor(other)

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        assert reduction == "sum"
        return tensor + self.other


def test_every_process_stops_when_any_process_got_a_signal():
    request = StopRequest(lambda: (0, False), announce=False)
    assert request.agreed(FakeAccelerator([0.0, 0.0])) is None
    assert request.agreed(FakeAccelerator([0.0, 1.0])) == signal.SIGTERM  # only the other process got it
    request.signum = signal.SIGINT
    assert request.agreed(FakeAccelerator([0.0, 1.0])) == signal.SIGINT  # its own signal decides its exit code


def test_the_handlers_are_restored_after_the_run():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with StopRequest(lambda: (5, False), announce=False) as request:
        assert signal.getsignal(signal.SIGTERM) == request._handle
        signal.raise_signal(signal.SIGTERM)  # recorded, not raised
        signal.raise_signal(signal.SIGINT)
    assert request.signum == signal.SIGTERM
    assert {s: signal.getsignal(s) for s in before} == before


SCRIPT = "custom_nodes/comfyui-lorweb/scripts/train_basis.py"  # the README's command from the ComfyUI folder


@pytest.mark.parametrize(
    "script, launcher",
    [
        (
            "custom_nodes/comfyui-lorweb/scripts/train_basis.py",
            "python custom_nodes/comfyui-lorweb/scripts/train_basis.py",
        ),
        (str(Path("lorweb_train") / "__main__.py"), "python -m lorweb_train"),
    ],
)
def test_the_resume_command_is_the_one_the_run_was_started_with(monkeypatch, script, launcher):
    """From the ComfyUI folder the run starts as scripts/train_basis.py, where ``-m lorweb_train`` is no module."""
    from lorweb_train.__main__ import _stopped_message, parse_args
    from lorweb_train.stopping import TrainingStopped

    monkeypatch.setattr(sys, "argv", [script, "--config", "my train.yaml"])
    message = _stopped_message(TrainingStopped(2, 3, "ck"), parse_args(["--config", "my train.yaml"]))
    assert message.endswith(f"{launcher} --config 'my train.yaml' --resume")
