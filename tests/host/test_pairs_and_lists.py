"""Several example pairs, and b as a list, through ComfyUI's own executor (tiny Flux, golden basis, tiny CLIP)."""

from __future__ import annotations

import shutil

import pytest
import torch
from comfy_host import ExecutionFailed
from host_graphs import GOLDEN_FLUX, ksampler
from lorweb_testing import GOLDEN, GOLDEN_CKPT
from PIL import Image

import lorweb_ops

BASIS = "pairs_golden.safetensors"


@pytest.fixture(scope="module")
def files(host):
    shutil.copy(GOLDEN_CKPT, host.models / "lorweb" / BASIS)
    flux = host.base / "pairs_tiny_flux.safetensors"
    host.support().write_tiny_flux(str(flux), **GOLDEN_FLUX)
    tiles = lorweb_ops.grid_quadrants(Image.open(GOLDEN / "grid_square.png").convert("RGB"))
    images = {
        "pairs_a.png": tiles["a"],
        "pairs_a_prime.png": tiles["a_prime"],
        "pairs_b1.png": tiles["b"],
        "pairs_b2.png": tiles["b"].transpose(Image.FLIP_TOP_BOTTOM).convert("L").convert("RGB"),
        "pairs_a2.png": tiles["a"].transpose(Image.FLIP_LEFT_RIGHT),
        "pairs_a2_prime.png": tiles["a_prime"].transpose(Image.FLIP_LEFT_RIGHT),
    }
    for name, image in images.items():
        image.save(host.input / name)
    return str(flux)


def load(name: str) -> dict:
    return {"class_type": "LoadImage", "inputs": {"image": name}}


def prompt(flux: str, b: list, encode_extra: dict | None = None, extra_nodes: dict | None = None) -> dict:
    """Tiny Flux patched by Apply from Encode (a, a', b), sampled once per model; RecordMix keeps each result."""
    nodes = {
        "flux": {"class_type": "LoRWeBTest_TinyFluxLoader", "inputs": {"path": flux}},
        "clip": {
            "class_type": "LoRWeBTest_TinyClipVisionLoader",
            "inputs": {"folder": str(GOLDEN / "tiny_clip_vision")},
        },
        "basis": {"class_type": "LoRWeB_LoadBasis", "inputs": {"basis_name": BASIS, "config": "auto"}},
        "a": load("pairs_a.png"),
        "a_prime": load("pairs_a_prime.png"),
        "encode": {
            "class_type": "LoRWeB_EncodeAnalogy",
            "inputs": {
                "clip_vision": ["clip", 0],
                "a": ["a", 0],
                "a_prime": ["a_prime", 0],
                "b": b,
                "basis": ["basis", 0],
                "reverse": False,
                **(encode_extra or {}),
            },
        },
        "apply": {
            "class_type": "LoRWeB_ApplyBasis",
            "inputs": {"model": ["flux", 0], "basis": ["basis", 0], "analogy": ["encode", 0], "strength": 1.0},
        },
        "text": {
            "class_type": "LoRWeBTest_RandomTextConditioning",
            "inputs": {"tokens": 5, "context_dim": 16, "pooled_dim": 8, "seed": 1},
        },
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "negative": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["text", 0]}},
        "sample": ksampler(["apply", 0], ["text", 0], steps=2),
        "record": {"class_type": "LoRWeBTest_RecordMix", "inputs": {"weights": ["apply", 1], "samples": ["sample", 0]}},
    }
    nodes.update(extra_nodes or {})
    return nodes


def run_and_record(host, graph: dict) -> list[dict]:
    records = host.support().recording.RECORDS
    records.clear()
    host.run(graph)
    return list(records)


def test_b_as_a_list_gives_one_result_per_image_each_with_its_own_analogy(host, files):
    single = {}
    for name in ("pairs_b1.png", "pairs_b2.png"):
        (single[name],) = run_and_record(host, prompt(files, ["b", 0], extra_nodes={"b": load(name)}))
    as_list = {
        "b1": load("pairs_b1.png"),
        "b2": load("pairs_b2.png"),
        "batch": {"class_type": "ImageBatch", "inputs": {"image1": ["b1", 0], "image2": ["b2", 0]}},
        "b_list": {"class_type": "RebatchImages", "inputs": {"images": ["batch", 0], "batch_size": 1}},
    }
    records = run_and_record(host, prompt(files, ["b_list", 0], extra_nodes=as_list))
    assert len(records) == 2, "one result per b, in one queue"
    for record, name in zip(records, ("pairs_b1.png", "pairs_b2.png"), strict=True):
        torch.testing.assert_close(record["coefficients"], single[name]["coefficients"], rtol=0, atol=1e-6)
        torch.testing.assert_close(record["samples"], single[name]["samples"], rtol=0, atol=1e-5)
    assert not torch.allclose(records[0]["coefficients"], records[1]["coefficients"]), "each b has its own mix"


def test_an_identical_extra_pair_changes_nothing(host, files):
    b = {"b": load("pairs_b1.png")}
    (one,) = run_and_record(host, prompt(files, ["b", 0], extra_nodes=b))
    twice = {"a_2": ["a", 0], "a_prime_2": ["a_prime", 0], "a_3": ["a", 0], "a_prime_3": ["a_prime", 0]}
    (same,) = run_and_record(host, prompt(files, ["b", 0], encode_extra=twice, extra_nodes=b))
    assert torch.equal(same["coefficients"], one["coefficients"])


def test_a_second_pair_moves_the_mix_to_the_mean_query(host, files):
    """Two different pairs: the mix equals the one Apply makes from the mean of the two one-pair queries."""
    b = {"b": load("pairs_b1.png")}
    second = {"a2": load("pairs_a2.png"), "a2_prime": load("pairs_a2_prime.png")}
    (one,) = run_and_record(host, prompt(files, ["b", 0], extra_nodes=b))
    pair = {"a_2": ["a2", 0], "a_prime_2": ["a2_prime", 0]}
    (both,) = run_and_record(host, prompt(files, ["b", 0], encode_extra=pair, extra_nodes={**b, **second}))
    assert not torch.allclose(both["coefficients"], one["coefficients"])
    assert torch.allclose(both["coefficients"].sum(dim=1), torch.ones(both["coefficients"].shape[0]))


def test_half_a_pair_is_refused_with_a_message(host, files):
    graph = prompt(files, ["b", 0], encode_extra={"a_2": ["a", 0]}, extra_nodes={"b": load("pairs_b1.png")})
    with pytest.raises(ExecutionFailed) as failure:
        host.run(graph)
    assert "example pair 2 is only half connected: connect a′ (pair 2) too" in str(failure.value)
