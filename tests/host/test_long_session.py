"""A long session in one ComfyUI process: 200 alternating analogies on one basis with one executor (as a server
runs them). Memory must settle, outputs must repeat exactly, and the model must come back bitwise."""

from __future__ import annotations

import gc

import torch
from host_graphs import golden_analogy, graph
from lorweb_testing import GOLDEN_TENSORS

RUNS = 200
WARM_UP = 20


def analogy_for(run: int) -> dict:
    node = golden_analogy()
    node["inputs"]["key"] = "query_square" if run % 2 == 0 else "query_nonsquare"
    return node


def test_two_hundred_alternating_analogies(host, files):
    import comfy.model_management
    import psutil  # a ComfyUI requirement

    executor = host.executor()
    process = psutil.Process()
    samples, baseline = {}, None
    for run in range(RUNS):
        host.run(graph(files["flux"], analogy_for(run)), executor=executor)
        result = host.support().PROBES["samples"]
        key = run % 2
        if key in samples:
            assert torch.equal(result, samples[key]), f"run {run} differs from run {run - 2}"
        samples[key] = result
        if run == WARM_UP:
            gc.collect()
            baseline = process.memory_info().rss
    gc.collect()
    growth = (process.memory_info().rss - baseline) / baseline
    assert not torch.equal(samples[0], samples[1])  # the two analogies do differ
    assert growth < 0.05, f"memory grew {100 * growth:.1f}% after warm-up over {RUNS - WARM_UP} runs"

    model = host.support().PROBES["model"]
    comfy.model_management.unload_all_models()
    restored = model.model.diffusion_model.state_dict()
    assert all(torch.equal(restored[k], files["original"][k]) for k in files["original"])
    print(
        f"\n{RUNS} runs; RSS after warm-up {baseline / 2**20:.0f} MiB, growth {100 * growth:+.2f}%"
        f" ({GOLDEN_TENSORS.name})"
    )
