"""The trainer end to end on the tiny Flux: it learns, resumes exactly, LoRA Reverse, --init, 2 processes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from tolerances import adam_first_step_tolerance, assert_reordered_close, reordered_sum_tolerance
from train_testing import (
    CharacterText,
    environment_with_paths,
    pixel_latents,
    tiny_clip_embedder,
    tiny_flux,
    training_config,
    write_pairs,
    write_quadruplets,
)

import lorweb_ops
from lorweb_ops.errors import LoRWeBError
from lorweb_ops.images import clip_batch, from_pil
from lorweb_train.cache import build_cache, load_cached
from lorweb_train.config import config_from_mapping
from lorweb_train.data import read_dataset
from lorweb_train.loss import bell_weights, sigmas_for
from lorweb_train.trainer import Trainer


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only fight over the 2 CI cores
    yield
    torch.set_num_threads(threads)


def make_trainer(tmp: Path, data_path: Path, **sections) -> Trainer:
    return Trainer(config_from_mapping(training_config(tmp, data_path, **sections), "test config"))


# ------------------------------------------------------------------------------------------------ it learns
def test_it_learns_the_analogy_and_the_mix_separates_the_kinds(tmp_path):
    """Two edits (red tint, blue tint) of flat colours; 16 train + 6 held-out analogies per kind, K = 4, r = 2.

    Measured when written (torch 2.13 CPU): held-out loss 1.174 untrained -> 0.877 after 300 steps; with the
    (a, a') of a same-kind example 0.879 vs 0.918 with an other-kind example (the mix carries the edit); the
    kinds' mean mixes are 2.6 x further apart (L1) than a kind's spread, nearest-centroid accuracy 11/12.
    """
    kinds_used = ("redden", "bluen")
    write_quadruplets(tmp_path / "train", 16, seed=1, kinds_used=kinds_used, flat=True)
    kinds = write_quadruplets(tmp_path / "held", 6, seed=2, kinds_used=kinds_used, flat=True)
    trainer = make_trainer(
        tmp_path,
        tmp_path / "train",
        train={"steps": 300, "save_every": 1000},
        model={"backend_options": {"seed": 0, "hidden": 32, "mlp": 64}},
    )
    held = build_cache(read_dataset(tmp_path / "held"), trainer.backend, trainer.config.cache_dir, 32)
    trainer.cached.update({f: load_cached(f, trainer.config.cache_dir) for f in held})
    untrained = float(trainer.validation_loss(held).mean())
    trainer.train()
    trained = float(trainer.validation_loss(held).mean())
    assert trained < 0.85 * untrained

    first = [f for f, k in zip(held, kinds, strict=True) if k == kinds_used[0]]
    second = [f for f, k in zip(held, kinds, strict=True) if k == kinds_used[1]]
    same = _loss_with_examples(trainer, [(f, g[(i + 1) % len(g)]) for g in (first, second) for i, f in enumerate(g)])
    crossed = [(f, o[i]) for g, o in ((first, second), (second, first)) for i, f in enumerate(g)]
    other = _loss_with_examples(trainer, crossed)
    assert other > 1.02 * same

    coefficients = trainer.coefficients_of(held)  # [examples, modules, K]
    is_first = torch.tensor([k == kinds_used[0] for k in kinds])
    centre_a, centre_b = coefficients[is_first].mean(0), coefficients[~is_first].mean(0)
    between = (centre_a - centre_b).abs().sum(-1).mean()
    within = 0.5 * ((coefficients[is_first] - centre_a).abs().sum(-1).mean()
                    + (coefficients[~is_first] - centre_b).abs().sum(-1).mean())  # fmt: skip
    assert between > 1.5 * within
    nearer_a = (coefficients - centre_a).abs().sum((1, 2)) < (coefficients - centre_b).abs().sum((1, 2))
    assert float((nearer_a == is_first).float().mean()) >= 0.8


def _loss_with_examples(trainer: Trainer, pairs: list[tuple[str, str]]) -> float:
    """Held-out loss when each example's (a, a') comes from another example (its own b, b' and grids kept)."""
    from lorweb_train.cache import CachedExample

    keys = []
    for own, example in pairs:
        mine, theirs = trainer.cached[own], trainer.cached[example]
        embeddings = torch.stack([theirs.embeddings[0], theirs.embeddings[1], mine.embeddings[2], mine.embeddings[3]])
        key = f"{own}|{example}"
        trainer.cached[key] = CachedExample(embeddings, mine.latents, mine.context, mine.pooled, mine.pair_only)
        keys.append(key)
    return float(trainer.validation_loss(keys).mean())


# ------------------------------------------------------------------------------------------------ seeded init
def test_the_same_config_trains_the_same_basis_whatever_the_global_rng(tmp_path):
    """The basis initialisation comes from the config's seed, not torch's global RNG: two trainers from one config,
    the global RNG reseeded and drawn from in between, start from and train to bit-identical bases; another seed
    starts elsewhere (so the seed is what decides)."""
    write_quadruplets(tmp_path / "data", 2, seed=1)
    shared = {"data": {"cache_dir": str(tmp_path / "cache")}, "train": {"steps": 2}}
    runs = []
    for number, global_seed in enumerate((11, 12345)):
        torch.manual_seed(global_seed)
        torch.rand(1000)
        trainer = make_trainer(tmp_path / f"run{number}", tmp_path / "data", **shared)
        initial = {name: p.detach().clone() for name, p in trainer.basis.named_parameters()}
        trainer.train()
        runs.append((initial, load_file(trainer.final_basis_path)))
    (initial_a, final_a), (initial_b, final_b) = runs
    assert initial_a.keys() == initial_b.keys() and all(torch.equal(initial_a[k], initial_b[k]) for k in initial_a)
    assert final_a.keys() == final_b.keys() and all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    other = make_trainer(tmp_path / "other", tmp_path / "data", seed=4, **shared)
    keys = [name for name in initial_a if name.endswith("lora_keys")]
    assert keys and all(not torch.equal(other.basis.state_dict()[k], initial_a[k]) for k in keys)


# ------------------------------------------------------------------------------------------------ resume
def test_resume_after_ctrl_c_continues_exactly(tmp_path):
    write_quadruplets(tmp_path / "data", 4, seed=1)
    shared = {"data": {"cache_dir": str(tmp_path / "cache")}, "train": {"steps": 6, "save_every": 100}}
    straight = make_trainer(tmp_path / "a", tmp_path / "data", **shared)
    straight.train()

    def interrupt(trainer: Trainer) -> None:
        if trainer.step == 3:
            raise KeyboardInterrupt

    stopped = make_trainer(tmp_path / "b", tmp_path / "data", **shared)
    with pytest.raises(KeyboardInterrupt):
        stopped.train(on_step_end=interrupt)
    assert (tmp_path / "b" / "out" / "checkpoints" / "step_00000003" / "trainer_state.json").is_file()
    resumed = make_trainer(tmp_path / "b", tmp_path / "data", **shared)
    assert resumed.resume() == 3
    resumed.train()
    assert resumed.losses == straight.losses  # the same numbers, not just close
    final_a = load_file(straight.final_basis_path)
    final_b = load_file(resumed.final_basis_path)
    assert final_a.keys() == final_b.keys() and all(torch.equal(final_a[k], final_b[k]) for k in final_a)


# ------------------------------------------------------------------------------------------------ LoRA Reverse
def test_pairs_train_with_lora_reverse_as_the_maths_says(tmp_path):
    """Pair-only data: the forward term (+dW on [a|a']/[a|a']) and the reverse term (-dW on the reversed grid, target
    b from b') recomputed here from the image files, the dense patch of the inference library and the formula."""
    write_pairs(tmp_path / "pairs", 2, seed=4)
    trainer = make_trainer(tmp_path, tmp_path / "pairs", data={"caption_dropout": 0.0}, train={"steps": 1})
    with torch.no_grad():
        for parameter in trainer.basis.parameters():
            parameter.normal_(0, 0.3, generator=torch.Generator().manual_seed(parameter.numel()))
    saved = trainer.config.output_dir + "/now.safetensors"
    from lorweb_train.basis_module import save_basis

    loaded = lorweb_ops.load_basis(save_basis(trainer.basis, saved, "now", dtype=torch.float32), use_cache=False)
    positions = trainer.global_positions(0, 0)
    batch = trainer.make_batch(positions)
    with torch.no_grad():
        forward_terms = trainer.term_losses(batch, reverse=False)
        reverse_terms = trainer.term_losses(batch, reverse=True)
        trainer.injector.clear_mix()
    embed, text = tiny_clip_embedder(), CharacterText()
    for i, position in enumerate(positions):
        stem = Path(trainer.example_at(position)).name
        example = next(e for e in read_dataset(tmp_path / "pairs") if _cache_name(trainer, e) == stem)
        a = Image.open(example.sources["a"]).convert("RGB").resize((16, 16), Image.LANCZOS)
        a_prime = Image.open(example.sources["a_prime"]).convert("RGB").resize((16, 16), Image.LANCZOS)
        swapped = bool(batch.orientation[i])
        first, second = (a_prime, a) if swapped else (a, a_prime)  # the orientation trained forward
        originals = [Image.open(example.sources[r]).convert("RGB") for r in ("a", "a_prime")]
        e_a, e_ap = embed(clip_batch(originals))
        query = torch.cat([e_ap, e_a, e_ap]) if swapped else torch.cat([e_a, e_ap, e_a])  # b = a, b' = a'
        coefficients = lorweb_ops.mixing_coefficients(loaded, query)
        context, pooled = text([example.instruction])
        for reverse, terms in ((False, forward_terms), (True, reverse_terms)):
            top_left, top_right = (second, first) if reverse else (first, second)
            target = _grid(top_left, top_right, top_left, top_right)
            control = _grid(top_left, top_right, top_left, top_left)
            indices, noise = batch.reverse_draw if reverse else batch.forward_draw
            expected = _hand_loss(
                loaded, coefficients, -1.0 if reverse else 1.0, target, control, noise[i], int(indices[i]),
                context, pooled, trainer.config.model.backend_options,
            )  # fmt: skip
            assert abs(float(terms[i]) - expected) < 1e-5 * max(1.0, expected)
    assert batch.reverse_weight.tolist() == [1.0] * len(positions)  # pairs only: the reverse term is on


def _cache_name(trainer: Trainer, example) -> str:
    from lorweb_train.cache import fingerprint

    return f"{fingerprint(example, 32, trainer.backend)}.safetensors"


def _grid(top_left, top_right, bottom_left, bottom_right) -> torch.Tensor:
    canvas = Image.new("RGB", (32, 32))
    for tile, corner in ((top_left, (0, 0)), (top_right, (16, 0)), (bottom_left, (0, 16)), (bottom_right, (16, 16))):
        canvas.paste(tile, corner)
    return pixel_latents(from_pil(canvas))


def _hand_loss(loaded, coefficients, sign, target, control, noise, index, context, pooled, options) -> float:
    model = tiny_flux(**options)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith(("double_blocks", "single_blocks")):
                module.weight += sign * lorweb_ops.flux_delta(loaded, coefficients, name)
        sigma = (1000 - index * 999 / 999) / 1000  # linspace(1000, 1, 1000)[index] / 1000
        noisy = (1 - sigma) * target + sigma * noise[None]
        prediction = model(
            noisy, torch.tensor([sigma]), context, y=pooled, guidance=torch.ones(1), ref_latents=[control]
        )
    weight = float(bell_weights()[index])
    return float((weight * (prediction - (noise[None] - target)) ** 2).mean())


def test_sigma_table_used_by_the_hand_check():
    assert math.isclose(float(sigmas_for(torch.tensor([7]))), (1000 - 7) / 1000, rel_tol=1e-6)


# ------------------------------------------------------------------------------------------------ --init
def test_init_fine_tunes_an_existing_basis_and_refuses_a_misfit(tmp_path):
    write_quadruplets(tmp_path / "data", 2, seed=1)
    first = make_trainer(tmp_path / "first", tmp_path / "data", train={"steps": 2})
    basis_path = first.train()
    tuned = make_trainer(
        tmp_path / "tuned", tmp_path / "data", network={"num_loras": 9, "rank": 7}, model={"init": basis_path}
    )
    stored = lorweb_ops.load_basis(basis_path, use_cache=False)
    assert (tuned.basis.num_loras, tuned.basis.rank) == (4, 2)  # from the file, not the yaml
    layer = tuned.basis.layer("transformer_blocks.0.attn.to_q")
    assert torch.equal(layer.lora_B.detach(), stored.module("transformer_blocks.0.attn.to_q").lora_B.float())
    with pytest.raises(LoRWeBError, match="another model"):
        make_trainer(tmp_path / "bad", tmp_path / "data",
                     model={"init": basis_path, "backend_options": {"seed": 0, "hidden": 32, "mlp": 64}})  # fmt: skip


# ------------------------------------------------------------------------------------------------ 2 processes
def test_two_processes_compute_the_same_as_one(tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` without GPUs (2 CPU processes, gloo DDP) vs
    ``python -m lorweb_train``, global batch 4.

    Pair-only data, so every step has two backward passes (forward term, LoRA Reverse term) through DDP. The two
    runs differ only in float32 summation order (DDP averages two local means of 2 samples instead of one mean of
    4), so the first step, taken from the same parameters, is compared within derived bounds
    (``tests/tolerances.py``): its loss and its gradient (AdamW's first moment is exactly ``(1 - beta1) g``) within
    the reordering bound, its parameters within what that gradient error can move AdamW's first update. Later
    steps start from parameters that already differ by those roundings, which AdamW's normalisation amplifies
    where a gradient is itself near zero, so they are not compared element by element.
    """
    write_pairs(tmp_path / "data", 4, seed=1)
    checkpoints = {}
    for processes in (1, 2):
        config = training_config(
            tmp_path / f"p{processes}", tmp_path / "data", train={"steps": 3, "batch_size": 4, "save_every": 1}
        )
        config_path = tmp_path / f"train{processes}.yaml"
        config_path.write_text(yaml.safe_dump(config))
        if processes == 1:
            command = [sys.executable, "-m", "lorweb_train", "--config", str(config_path)]
        else:
            # accelerate 1.x: "--cpu --num_processes 2" starts ONE process unless MPI is set up; the torchrun
            # launcher (--multi_gpu) on a machine without visible GPUs gives 2 CPU processes on gloo (MULTI_CPU)
            command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                       "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
                       "lorweb_train", "--config", str(config_path)]  # fmt: skip
        env = environment_with_paths() | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        checkpoints[processes] = tmp_path / f"p{processes}" / "out" / "checkpoints"
        assert (checkpoints[processes] / "step_00000003" / f"random_states_{processes - 1}.pkl").is_file()
    trainer = make_trainer(tmp_path / "terms", tmp_path / "data", train={"batch_size": 4})
    names = [name for name, _ in trainer.basis.named_parameters()]  # the optimiser's parameter order
    first = {processes: _first_step(root / "step_00000001", names) for processes, root in checkpoints.items()}
    gradient_terms, loss_terms = summed_terms(trainer, backward_passes=2)
    one_loss, two_loss = first[1]["loss"], first[2]["loss"]
    assert abs(two_loss - one_loss) <= reordered_sum_tolerance(loss_terms, abs(one_loss))
    lr, eps = trainer.config.train.lr, 1e-8  # torch AdamW's default eps (the trainer keeps it)
    assert first[1]["parameters"].keys() == first[2]["parameters"].keys()
    moved = 0.0
    for key, gradient in first[1]["gradients"].items():
        assert_reordered_close(first[2]["gradients"][key], gradient, gradient_terms, f"step 1 gradient {key}")
        bound = reordered_sum_tolerance(gradient_terms, float(gradient.abs().max()))
        one, two = first[1]["parameters"][key], first[2]["parameters"][key]
        allowed = adam_first_step_tolerance(gradient, bound, one, lr, eps)
        assert bool(((two - one).abs() <= allowed).all()), f"step 1 parameters {key}"
        moved = max(moved, float(gradient.abs().max()))
    assert moved > 0


def _first_step(folder: Path, names: list[str]) -> dict:
    """The loss, gradient and parameters of step 1 from an accelerate checkpoint (``optimizer.bin``'s AdamW state)."""
    state = torch.load(folder / "optimizer.bin", weights_only=True)
    beta1 = state["param_groups"][0]["betas"][0]
    parameters = load_file(str(folder / "model.safetensors"))
    assert sorted(parameters) == sorted(names), f"{folder}: other parameters than the basis's"
    gradients = {name: state["state"][i]["exp_avg"] / (1 - beta1) for i, name in enumerate(names)}
    losses = json.loads((folder / "trainer_state.json").read_text())["losses"]
    return {"loss": float(losses[0][1]), "gradients": gradients, "parameters": parameters}


def test_validation_split_is_reported_and_plotted(tmp_path):
    write_quadruplets(tmp_path / "data", 2, seed=1)
    trainer = make_trainer(tmp_path, tmp_path / "data", data={"validation_fraction": 0.5}, train={"steps": 2})
    assert len(trainer.validation_files) == 2 and len(trainer.train_files) == 2
    assert not set(trainer.validation_files) & set(trainer.train_files)
    trainer.train()
    assert [step for step, _ in trainer.validation_losses] == [2]
    with Image.open(Path(trainer.config.output_dir) / "loss.png") as plot:
        assert plot.format == "PNG" and plot.size == (800, 400)
    saved = yaml.safe_load((Path(trainer.config.output_dir) / "train_config.yaml").read_text())
    assert saved["data"]["validation_fraction"] == 0.5


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    """2 micro-batches of 2 give the gradient and the loss of one batch of 4 (the same samples, the same average).

    Every step starts from the same parameters and optimiser state (copied from the batch-of-4 run), and the
    gradients are compared as the optimiser receives them (no clipping), within the float32 reordering bound of
    ``tests/tolerances.py``: both sum the same per-token terms, grouped 4 vs 2 + 2. Three steps, so the
    micro-batches' positions move on with the step.
    """
    write_quadruplets(tmp_path / "data", 4, seed=1)
    shared = {"cache_dir": str(tmp_path / "cache")}
    train = {"steps": 3, "max_grad_norm": 0}
    whole = make_trainer(tmp_path / "whole", tmp_path / "data", data=shared, train=train | {"batch_size": 4})
    accumulated = make_trainer(
        tmp_path / "accumulated",
        tmp_path / "data",
        data=shared,
        train=train | {"batch_size": 2, "gradient_accumulation_steps": 2},
    )
    gradient_terms, loss_terms = summed_terms(whole)
    for _ in range(3):
        accumulated.basis.load_state_dict(whole.basis.state_dict())
        accumulated.optimizer.load_state_dict(whole.optimizer.state_dict())
        whole_loss, whole_gradients = step_with_gradients(whole)
        accumulated_loss, accumulated_gradients = step_with_gradients(accumulated)
        assert abs(accumulated_loss - whole_loss) <= reordered_sum_tolerance(loss_terms, abs(whole_loss))
        assert whole_gradients.keys() == accumulated_gradients.keys()
        assert max(float(g.abs().max()) for g in whole_gradients.values()) > 0
        for name, gradient in whole_gradients.items():  # lora_A's are exactly 0 at step 0 (lora_B starts at 0)
            assert_reordered_close(accumulated_gradients[name], gradient, gradient_terms, f"step {whole.step}: {name}")


def summed_terms(trainer: Trainer, backward_passes: int = 1) -> tuple[int, int]:
    """How many terms one gradient element and one step's loss sum, over the whole global batch of a step.

    A Linear's weight gradient sums ``x_t dy_t`` over every token t of every sample (noise and Kontext reference
    tokens in 2 x 2 patches, and the text tokens), once per backward pass; the loss averages every latent value.
    """
    positions = trainer.global_positions(0, 0)
    batch = trainer.make_batch(positions)
    latent = batch.latents["target_0"]
    tokens = 2 * (latent.shape[-2] // 2) * (latent.shape[-1] // 2) + batch.context.shape[1]
    samples = len(positions) * trainer.config.train.gradient_accumulation_steps
    return samples * tokens * backward_passes, samples * latent[0].numel() * backward_passes


def step_with_gradients(trainer: Trainer) -> tuple[float, dict[str, torch.Tensor]]:
    """One ``train_step``; returns its loss and the gradients the optimiser was handed."""
    seen: dict[str, torch.Tensor] = {}
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen.update({name: p.grad.detach().clone() for name, p in trainer.basis.named_parameters()})
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    try:
        loss = trainer.train_step()
    finally:
        trainer.optimizer.step = step
    return loss, seen
