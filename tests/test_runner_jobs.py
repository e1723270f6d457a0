"""The headless runner's work list without ComfyUI: the split between processes, --skip-existing, name clashes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from runner_jobs import Share, b_images, not_done  # noqa: E402
from runner_prompt import RunSettings  # noqa: E402


def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"x")


def test_torchrun_environment_splits_the_sorted_images(tmp_path):
    _touch(tmp_path, "e.png", "a.jpg", "c.PNG", "b.webp", "d.png", "notes.txt")
    images = b_images(tmp_path)
    assert [p.name for p in images] == ["a.jpg", "b.webp", "c.PNG", "d.png", "e.png"]
    shares = [Share.from_environment({"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)}) for r in (0, 1)]
    assert [[p.name for p in share.pick(images)] for share in shares] == [
        ["a.jpg", "c.PNG", "e.png"],
        ["b.webp", "d.png"],
    ]
    assert shares[1].label == "[rank 1/2] " and Share.from_environment({}).label == ""
    assert Share.from_environment({}).pick(images) == images


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(SystemExit, match="RANK=2 does not fit WORLD_SIZE=2"):
        Share.from_environment({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(SystemExit, match="whole numbers"):
        Share.from_environment({"RANK": "one"})


def test_images_whose_results_would_collide_are_refused(tmp_path):
    _touch(tmp_path, "cat.png", "cat.jpg", "dog.png")
    with pytest.raises(SystemExit, match=r"share a name \(cat\)"):
        b_images(tmp_path)


def test_skip_existing_needs_every_asked_for_output(tmp_path):
    images = [tmp_path / "in" / name for name in ("a.png", "b.png", "c.png")]
    out = tmp_path / "out"
    _touch(out, "a_b_prime.png", "a_grid.png", "b_b_prime.png")
    assert not_done(images, RunSettings(), out) == images[2:]
    assert not_done(images, RunSettings(save_grid=True), out) == images[1:]
