"""Every kind of bad config, data file and ``--init`` basis, each run through the CLI as the user runs it.

Each case builds its input in a fresh folder and runs ``python -m lorweb_train`` in its own process (the tiny test
backend of ``train_testing``, CPU, one thread) with a timeout and a cap on its address space, then checks: exit
code 2, the pack's message ("LoRWeB training:" and a phrase naming what was wrong), no traceback, nothing written
outside output_dir (the folder is listed before and after; HOME and TMPDIR point into it, so writes to caches or
temporary files count too), and no basis .safetensors written.

Kinds already run through the CLI elsewhere, not repeated here:

- ``test_train_safety``: an output_dir that is not writable; a name that leaves output_dir; train.lr inf / NaN / 0,
  train.betas NaN / 1.0, huge rank / num_loras / keys_dim / resolution / batch_size; a bad ``--set`` value; an
  image whose header declares a huge size (PIL's bomb bound and the pack's 64 MP bound); an unknown or missing
  device; a new run in another run's folder and a misfit ``--resume``; NaN text encodings; a diverging run.
- ``test_train_signals``: truncated, emptied or half-written ``--resume`` checkpoints; SIGINT / SIGTERM mid-step
  and mid-save (the good checkpoint survives, resume is exact).
"""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from train_testing import environment_with_paths, training_config, write_pairs, write_quadruplets

TIMEOUT = 120  # seconds; a refused case takes ~2-8 s on one CI core (torch import, tiny model, a few images)
#: Address-space cap: a good tiny run (python, torch, accelerate, the tiny model, 4 steps) peaks at about
#: 0.95 GiB of address space on CPU torch 2.x / Linux (``VmPeak``, measured with the ``baseline`` fixture below,
#: which takes the actual figure of the machine at hand). A refused case stops before training, so it needs no more
#: than that; the margin of 512 MiB absorbs thread stacks and malloc arenas, and is far below what any hostile size
#: implies (a 30000^2 image decodes to 3.4 GiB, a 10^9 x 10^9 tensor to 4 EB, a 100 MB instruction read whole and
#: tokenised to several hundred MB), so an allocation made before a size check fails the case instead of passing.
MARGIN = 512 * 2**20


# ------------------------------------------------------------------------------------------------ harness
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


CAP_WORKS = sys.platform.startswith("linux") and os.path.exists("/proc/self/status")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> int:
    """The peak address space (bytes) of a good tiny run, measured in a child that reports its own VmPeak."""
    if not CAP_WORKS:
        return 0
    tmp = tmp_path_factory.mktemp("baseline")
    write_quadruplets(tmp / "data", 1, seed=1)
    (tmp / "train.yaml").write_text(yaml.safe_dump(training_config(tmp, tmp / "data", train={"batch_size": 2})))
    probe = (
        "import atexit, runpy, sys\n"
        "def peak():\n"
        "    with open('/proc/self/status') as s:\n"
        "        print('VMPEAK', next(l.split()[1] for l in s if l.startswith('VmPeak:')), file=sys.stderr)\n"
        "atexit.register(peak)\n"
        f"sys.argv = ['lorweb_train', '--config', {str(tmp / 'train.yaml')!r}]\n"
        "runpy.run_module('lorweb_train', run_name='__main__', alter_sys=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], env=_environment(tmp), capture_output=True, text=True,
                            timeout=TIMEOUT)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp / "out" / "tiny_basis.safetensors").is_file()
    return int(result.stderr.rsplit("VMPEAK", 1)[1].split()[0]) * 1024


def _environment(tmp: Path) -> dict:
    home = tmp / "home"
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    env = environment_with_paths() | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return env | {"HOME": str(home), "TMPDIR": str(home / "tmp"), "XDG_CACHE_HOME": str(home / ".cache")}


def listing(folder: Path, skip: Path) -> dict[str, tuple]:
    """Every path under ``folder`` outside ``skip``: files with size and mtime (a rewrite shows), folders by name.

    Left out: torch's own per-user compile-cache folder ``$TMPDIR/torchinductor_<user>``, which importing
    transformers' CLIP (the test backend's image encoder) creates empty; it is torch's, not the trainer's output.
    """
    found = {}
    for path in folder.rglob("*"):
        if path == skip or skip in path.parents:
            continue
        if path.name.startswith("torchinductor_") and path.parent.name == "tmp" and not any(path.iterdir()):
            continue
        stat = path.lstat()
        found[str(path.relative_to(folder))] = "folder" if path.is_dir() else (stat.st_size, stat.st_mtime_ns)
    return found


def run_capped(tmp: Path, args: list[str], cap: int, env: dict) -> subprocess.CompletedProcess:
    def limit() -> None:
        if cap:
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    command = [sys.executable, "-m", "lorweb_train", "--config", str(tmp / "train.yaml"), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT, preexec_fn=limit,
                          cwd=tmp)  # fmt: skip


# ------------------------------------------------------------------------------------------------ inputs
def good_config(tmp: Path, **sections) -> dict:
    return training_config(tmp, tmp / "data", **sections)


def write_config(tmp: Path, document: dict | str | bytes) -> None:
    path = tmp / "train.yaml"
    if isinstance(document, bytes):
        path.write_bytes(document)
    else:
        path.write_text(document if isinstance(document, str) else yaml.safe_dump(document))


def config_text(text: Callable[[Path], str | bytes]) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        write_quadruplets(tmp / "data", 1, seed=1)
        write_config(tmp, text(tmp))
        return []

    return build


def config_values(**sections) -> Callable[[Path], list[str]]:
    return config_text(lambda tmp: yaml.safe_dump(good_config(tmp, **sections)))


def billion_laughs(tmp: Path) -> str:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    return "\n".join(lines) + "\n"


def record_of(tmp: Path, line: int = 0) -> dict:
    return json.loads((tmp / "data" / "metadata.jsonl").read_text().splitlines()[line])


def data_case(breakage: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        write_quadruplets(tmp / "data", 1, seed=1)
        breakage(tmp / "data")
        write_config(tmp, good_config(tmp))
        return []

    return build


def replace_image(role: str, write: Callable[[Path], None]) -> Callable[[Path], None]:
    def breakage(data: Path) -> None:
        record = json.loads((data / "metadata.jsonl").read_text().splitlines()[0])
        write(data / record[role])

    return breakage


def truncated_png(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def edit_metadata(**values) -> Callable[[Path], None]:
    def breakage(data: Path) -> None:
        lines = (data / "metadata.jsonl").read_text().splitlines()
        lines[0] = json.dumps(json.loads(lines[0]) | values)
        (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")

    return breakage


def sparse(path: Path, size: int) -> None:
    """A file of ``size`` NUL bytes that takes no disk space."""
    with open(path, "wb") as handle:
        handle.truncate(size)


def huge_instruction_file(data: Path) -> None:
    """The folder layout (pairs), with a 100 MB instructions/<name>.txt."""
    write_pairs(data, 1, seed=1)
    os.remove(data / "metadata.jsonl")
    sparse(data / "instructions" / "000.txt", 100 * 2**20)


def huge_metadata_line(data: Path) -> None:
    with open(data / "metadata.jsonl", "ab") as handle:
        handle.write(b'{"a": "000_a.png", "instruction": "' + b"x" * (100 * 2**20) + b'"}\n')


def init_case(write: Callable[[Path], None], name: str = "init.safetensors") -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        write_quadruplets(tmp / "data", 1, seed=1)
        write_config(tmp, good_config(tmp))
        write(tmp / name)
        return ["--init", str(tmp / name)]

    return build


def basis_tensors(module: str = "transformer.transformer_blocks.0.attn.to_q", width: int = 16, fill: float = 0.1):
    """A well-formed basis for one module (K = 2, rank 1, keys 3, queries 6)."""
    return {
        f"{module}.lora_A": torch.full((2, width, 1), fill),
        f"{module}.lora_B": torch.full((2, 1, width), fill),
        f"{module}.lora_keys": torch.full((2, 3), fill),
        f"{module}.att_lora_to_q.weight": torch.full((3, 6), fill),
    }


def write_basis(**kwargs) -> Callable[[Path], None]:
    return lambda path: save_file(basis_tensors(**kwargs), str(path))


def truncated_basis(path: Path) -> None:
    save_file(basis_tensors(width=256), str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def huge_tensor_header(length: int = 0) -> Callable[[Path], None]:
    """A header that claims a 10^9 x 10^9 float32 tensor (4 EB) over 8 bytes of data; or a header ``length``."""

    def write(path: Path) -> None:
        module = "transformer.transformer_blocks.0.attn.to_q"
        entries = {f"{module}.lora_A": {"dtype": "F32", "shape": [10**9, 10**9], "data_offsets": [0, 8]}}
        header = json.dumps(entries).encode()
        path.write_bytes(struct.pack("<Q", length or len(header)) + header + b"\0" * 8)

    return write


def nan_basis(path: Path) -> None:
    tensors = basis_tensors()
    tensors["transformer.transformer_blocks.0.attn.to_q.lora_A"][0, 0, 0] = float("nan")
    save_file(tensors, str(path))


CASES = {
    # config: what the yaml holds
    "unknown key": (config_values(network={"num_lora": 4}),
                    "unknown config key 'network.num_lora'. Did you mean 'network.num_loras'"),
    "unknown section": (config_values(trian={"steps": 1}), "unknown config key 'trian'. Did you mean 'train'"),
    "a very long unknown key": (config_values(train={"k" * 100_000: 1}), "unknown config key 'train.kkk"),
    "mistyped value": (config_values(train={"steps": "many"}), "train.steps must be a int"),
    "a list for a section": (config_values(train=[1, 2]), "train must be a section (a mapping)"),
    "betas inf": (config_values(train={"betas": [float("inf"), 0.99]}), "train.betas must be two numbers"),
    "betas one number": (config_values(train={"betas": 0.9}), "train.betas must be two numbers"),
    "guidance NaN": (config_values(train={"guidance": float("nan")}), "train.guidance must be"),
    "reverse_weight inf": (config_values(train={"reverse_weight": float("inf")}), "train.reverse_weight must be"),
    "seed huge": (config_values(seed=10**30), "seed must be"),
    "steps huge": (config_values(train={"steps": 10**30}), "train.steps must be"),
    "billion laughs": (config_text(billion_laughs), "uses YAML aliases"),
    "deep nesting": (config_text(lambda tmp: "train: " + "[" * 5000 + "]" * 5000 + "\n"), "nests deeper than 32"),
    "1 MB config": (config_text(lambda tmp: "# padding\n" * 100_000), "is larger than 256 kB"),
    "not YAML": (config_text(lambda tmp: "train: {lr: 1e-3\n"), "is not readable YAML"),
    "binary": (config_text(lambda tmp: bytes(range(256)) * 8), "is not UTF-8 text"),
    "empty file": (config_text(lambda tmp: ""), "is empty"),
    "list at top level": (config_text(lambda tmp: "- data\n- train\n"), "must be a mapping of sections"),
    "a scalar at top level": (config_text(lambda tmp: "hello\n"), "must be a mapping of sections"),
    # data: files in the data folder
    "truncated PNG": (data_case(replace_image("b", truncated_png)), "cannot read image"),
    "0-byte image": (data_case(replace_image("a_prime", lambda p: p.write_bytes(b""))), "cannot read image"),
    "text named .png": (data_case(replace_image("a", lambda p: p.write_text("hello"))), "cannot read image"),
    "mismatched sizes": (data_case(replace_image("a_prime", lambda p: Image.new("RGB", (48, 32)).save(p))),
                         "the images have different sizes"),
    "metadata not JSON": (data_case(lambda d: (d / "metadata.jsonl").write_text('{"a": "000_a.png",\n')),
                          "line 1 is not valid JSON"),
    "metadata not an object": (data_case(lambda d: (d / "metadata.jsonl").write_text("[1, 2]\n")),
                               "line 1 must be a JSON object"),
    "missing image": (data_case(lambda d: (d / "000_b_prime.png").unlink()), "000_b_prime.png does not exist"),
    "path leaves the data folder": (data_case(edit_metadata(b="../../etc/passwd")), "leaves the data folder"),
    "absolute path": (data_case(edit_metadata(b="/etc/passwd")), "leaves the data folder"),
    "100 MB instruction file": (data_case(huge_instruction_file), "000.txt is 104857600 bytes, more than the 64 kB"),
    "100 MB metadata line": (data_case(huge_metadata_line), "line 3 is longer than 80 kB"),
    # --init: the basis to fine-tune
    "init not safetensors": (init_case(lambda p: p.write_text("hello " * 100)), "could not be read as safetensors"),
    "init pickle": (init_case(lambda p: p.write_bytes(b"\x80\x04."), "init.pt"), "is not a .safetensors file"),
    "init truncated": (init_case(truncated_basis), "damaged or incomplete"),
    "init huge tensor": (init_case(huge_tensor_header()), "could not be read as safetensors"),
    "init huge header": (init_case(huge_tensor_header(2**62)), "could not be read as safetensors"),
    "init NaN": (init_case(nan_basis), "NaN"),
    "init other modules": (init_case(write_basis(module="transformer.transformer_blocks.99.attn.to_q")),
                           "names modules the model does not have"),
    "init other shapes": (init_case(write_basis(width=32)), "but the model's is 16 -> 16"),
    "init 0 bytes": (init_case(lambda p: p.write_bytes(b"")), "could not be read as safetensors"),
    "init directory": (init_case(lambda p: p.mkdir()), "is a folder, not a basis file"),
    "init missing": (init_case(lambda p: None), "not found"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_input_gets_the_packs_message_and_writes_nothing(tmp_path, baseline, case):
    build, message = CASES[case]
    args = build(tmp_path)
    out, env = tmp_path / "out", _environment(tmp_path)
    before = listing(tmp_path, out)
    result = run_capped(tmp_path, args, baseline + MARGIN if baseline else 0, env)
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "LoRWeB training:" in result.stderr and message in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    assert len(result.stderr) < 20_000, "the message repeats the hostile input"
    assert listing(tmp_path, out) == before, "the run wrote outside output_dir"
    assert not list(out.glob("*.safetensors")) and not list(out.glob("checkpoints/*")), sorted(out.rglob("*"))
    if case.startswith("init"):  # refused before the model loads and the cache is built
        assert not [p for p in out.rglob("*") if p.is_file()], sorted(out.rglob("*"))
