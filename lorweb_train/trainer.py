"""The training loop on HF accelerate: data order, per-sample randomness, loss terms, checkpoints, exact resume.

Determinism by construction: the global batch of step ``s`` is a fixed slice of a seeded per-epoch permutation,
and every sample's randomness (swap, caption dropout, timestep, noise) comes from a generator seeded by its global
position. A process takes its share of the global batch, so N processes compute the same maths as one, and a
resumed run draws exactly what an uninterrupted run would have drawn.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from lorweb_ops.analogy import combine_embeddings
from lorweb_ops.basis import load_basis
from lorweb_ops.errors import LoRWeBError

from .backend import FluxBackend, make_backend
from .basis_module import TrainableBasis, init_generator, network_from_basis, save_basis
from .cache import GRID_ORDER, CachedExample, CachedExamples, build_cache, cached_shapes, load_empty_text
from .checkpoints import STATE_FILE, checkpoint_problem, read_trainer_state
from .config import TrainingConfig, dump_config, prepare_output_dir
from .data import read_dataset
from .injection import BasisInjector, disable_gradient_checkpointing, enable_gradient_checkpointing, flux_module_shapes
from .loss import draw_noise, flow_matching_loss, noisy_latents, sigmas_for
from .plot import write_loss_plot
from .sampling import bottom_right, euler_sample, grid_quadrants, sample_sheet, sigma_schedule, write_png
from .stopping import StopRequest, TrainingStopped

_SAVE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_EMBEDDING_NAMES = ("a", "a_prime", "b", "b_prime")
_MAX_SKIPPED_STEPS = 25  # fp16 overflow skips in a row before the run counts as diverged
_SAMPLE_ANALOGIES = 4  # rows of a sample sheet: enough to see the edit, few enough not to stall training
_AUTO_SAMPLE_EVERY = 250  # train.sample_every: -1 on CUDA (a sheet costs ~4 x sample_steps forwards)
_SAMPLE_SEED_OFFSET = 7_777_777  # sample noise seeds, apart from the per-position training seeds


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when torch sees a GPU, else cpu (with a notice); cuda / cuda:N must exist (else a message).

    cuda:N becomes the current CUDA device, which accelerate uses in a single process (a multi-process launch
    gives each process its own GPU)."""
    available = torch.cuda.is_available()
    if device == "auto":
        if not available:
            print("LoRWeB training: no CUDA GPU found, training on the CPU (slow; --device cuda to require a GPU).")
        return "cuda" if available else "cpu"
    if device == "cpu":
        return device
    if not available:
        raise LoRWeBError(
            f"--device {device}: torch sees no CUDA GPU (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda or 'none'}). Use --device cpu, or install a CUDA build of torch and the driver."
        )
    index = int(device.partition(":")[2] or torch.cuda.current_device())
    if index >= torch.cuda.device_count():
        raise LoRWeBError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) (cuda:0 ..).")
    torch.cuda.set_device(index)
    return "cuda"


def _memory_bytes(device: torch.device) -> int:
    """Total memory of the device the basis lives on (physical RAM for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): assume a generous 64 GiB
        return 64 * 2**30


def _all_finite(tensors) -> bool:
    """One device sync for all tensors (the maximum propagates NaN and Inf)."""
    maxima = [t.detach().abs().amax().float() for t in tensors]
    return not maxima or bool(torch.isfinite(torch.stack(maxima)).all())


@dataclass
class Batch:
    queries: torch.Tensor  # [B, Dq] for the orientation trained forward
    latents: dict  # "target"/"control" x orientation: [B, C, h, w]
    orientation: torch.Tensor  # [B] 0 = as given, 1 = swapped
    context: torch.Tensor
    pooled: torch.Tensor
    forward_draw: tuple  # (indices [B], noise [B, C, h, w])
    reverse_draw: tuple
    reverse_weight: torch.Tensor  # [B]


class Trainer:
    def __init__(self, config: TrainingConfig, *, backend: FluxBackend | None = None, accelerator=None) -> None:
        from accelerate import Accelerator

        self.config = config
        prepare_output_dir(config.output_dir)  # before any model is loaded: an unwritable folder fails now
        prepare_output_dir(config.cache_dir, "data.cache_dir")
        # the --init file is read and checked before the model loads: a bad file is a message in seconds
        self.init = load_basis(config.model.init, use_cache=False) if config.model.init else None
        cpu = resolve_device(config.device) == "cpu"
        self.accelerator = accelerator or Accelerator(
            cpu=cpu,  # without it accelerate ignores a multi-process CPU launch
            mixed_precision=config.train.mixed_precision,
            log_with=config.train.log_with or None,
            project_dir=config.output_dir,
            step_scheduler_with_optimizer=False,
        )
        self.device = self.accelerator.device
        self.global_batch = config.train.batch_size
        if self.global_batch % self.accelerator.num_processes:
            raise LoRWeBError(
                f"train.batch_size {self.global_batch} cannot be split over {self.accelerator.num_processes} "
                "processes; use a multiple of the number of processes."
            )
        self.local_batch = self.global_batch // self.accelerator.num_processes
        self.backend = backend or make_backend(config.model, self.device)
        for parameter in self.backend.diffusion_model.parameters():
            parameter.requires_grad_(False)  # frozen base: only the basis trains
        self.model_shapes = flux_module_shapes(self.backend.diffusion_model)
        self.network = network_from_basis(self.init, config.network) if self.init else config.network
        self.module_names = self._module_names()  # before the cache: a misfit --init should not wait for encoding
        self.sample_every = self._sample_interval()  # before the cache: a refusal should not wait for encoding
        if not self.sample_every:
            self.backend.decode_latents = None  # no samples: let the decoder go with the encoders
        self._sample_inputs: dict[str, list[torch.Tensor]] = {}
        self.sampled_at: int | None = None
        self._prepare_data()
        self._build_basis()
        self.losses: list[tuple[int, float]] = []
        self.validation_losses: list[tuple[int, float]] = []
        self.step = 0
        self.skipped_in_a_row = 0
        self._phase: str | None = None  # "step" or "save" while one runs: the state is then no finished step
        self._saved_step: int | None = None  # the step of the newest checkpoint on disk

    # ----------------------------------------------------------------------------------------------- setup
    def _prepare_data(self) -> None:
        config = self.config
        examples = read_dataset(config.data.path, config.data.layout)
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(config.seed))
        held_out = int(len(examples) * config.data.validation_fraction)
        if len(examples) - held_out < 1:
            raise LoRWeBError(f"{config.data.path}: data.validation_fraction leaves no training examples.")
        with self.accelerator.main_process_first():  # the main process fills the cache, the others reuse it
            files = build_cache(examples, self.backend, config.cache_dir, config.data.resolution)
        self.backend.release_encoders()
        self.train_files = [files[i] for i in sorted(order[held_out:].tolist())]
        self.validation_files = [files[i] for i in sorted(order[:held_out].tolist())]
        self.cached = CachedExamples(config.cache_dir)
        self.pair_only = {path: example.pair_only for path, example in zip(files, examples, strict=True)}
        self.empty_context, self.empty_pooled = load_empty_text(config.cache_dir)
        headers = {path: cached_shapes(path) for path in files}
        self.embed_dim = headers[files[0]][1]
        shapes = {headers[f][0] for f in self.train_files}
        if len(shapes) > 1 and self.local_batch > 1:
            raise LoRWeBError(
                f"{config.data.path}: the examples have different aspect ratios (latent grids {sorted(shapes)}), "
                "which cannot share a batch. Crop them to one aspect ratio, or use train.batch_size equal to the "
                "number of processes."
            )
        self.reverse_default = config.train.reverse_weight
        self._permutations: dict[int, torch.Tensor] = {}

    def _module_names(self) -> list[str]:
        """The modules the basis trains, checked against the model (and the --init file's shapes against them)."""
        network, model_shapes, init = self.network, self.model_shapes, self.init
        names = list(model_shapes) if network.modules in ("all", None, "") else list(network.modules)
        unknown = [name for name in names if name not in model_shapes]
        if unknown:
            source = f"--init {init.path}" if init else "network.modules"
            raise LoRWeBError(
                f"{source} names modules the model does not have (e.g. {unknown[:3]}); it was made for another "
                "model. Use a basis for this model (or module names it has)."
            )
        if init is not None:
            self._check_init_fits(init, model_shapes, names)
        return names

    def _build_basis(self) -> None:
        config, model = self.config, self.backend.diffusion_model
        model_shapes, network, init, names = self.model_shapes, self.network, self.init, self.module_names
        query_dim = self.embed_dim * (3 if network.query_mode == "cat-aa'b" else 1)
        if init is not None and init.query_dim != query_dim:
            raise LoRWeBError(
                f"--init {init.path}: the basis expects queries of {init.query_dim} values but the image encoder "
                f"gives {query_dim}. Use the encoder the basis was trained with ({init.settings.external_query_model})."
            )
        shapes = {name: model_shapes[name] for name in names}
        self._check_basis_memory(shapes, network, query_dim)
        basis = TrainableBasis(shapes, network, query_dim, init_generator(config.seed))
        if init is not None:
            basis.load_from_basis(init)
        basis.to(self.device)
        self.basis = basis
        self.injector = BasisInjector(model, basis).attach()
        if config.train.gradient_checkpointing or self.backend.needs_checkpointing:
            if not config.train.gradient_checkpointing:
                self.accelerator.print(
                    "LoRWeB training: gradient checkpointing is on although train.gradient_checkpointing is false: "
                    f"{self.backend.description}'s blocks add their residuals in place, which only recomputed "
                    "blocks can be trained through."
                )
            enable_gradient_checkpointing(model)
        optimizer = self._optimizer(basis)
        scheduler = self._scheduler(optimizer)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(basis, optimizer, scheduler)

    def _sample_interval(self) -> int:
        """``train.sample_every`` resolved: -1 (auto) is 250 on CUDA and never on the CPU, where one sheet would
        cost as much as many training steps. Asked-for samples need the backend's VAE decoder."""
        configured = self.config.train.sample_every
        can_decode = self.backend.decode_latents is not None
        if configured == -1:
            if self.device.type != "cuda":
                return 0
            if not can_decode:
                self.accelerator.print(
                    f"LoRWeB training: the backend {self.backend.description!r} has no VAE decoder "
                    "(decode_latents), so no samples are rendered."
                )
                return 0
            return _AUTO_SAMPLE_EVERY
        if configured > 0 and not can_decode:
            raise LoRWeBError(
                f"train.sample_every is {configured} but the model backend {self.backend.description!r} has no "
                "decode_latents (VAE decoder), so samples cannot be rendered. Set train.sample_every: 0, or give "
                "the backend a decode_latents function (model.backend: comfyui has one)."
            )
        return configured

    def _check_basis_memory(self, shapes: dict, network, query_dim: int) -> None:
        """Before allocating: the basis' fp32 values, gradients and two AdamW states must fit the machine."""
        k, r, keys = network.num_loras, network.rank, network.keys_dim
        values = sum(k * (i * r + r * o + keys) + keys * query_dim for i, o in shapes.values())
        needed, available = 16 * values, _memory_bytes(self.device)
        if needed > available:
            raise LoRWeBError(
                f"the basis (K = {k}, rank {r}, keys {keys}, {len(shapes)} modules) needs about "
                f"{needed / 2**30:.1f} GiB for its values, gradients and optimiser states, more than the "
                f"{available / 2**30:.1f} GiB of {self.device}. Lower network.num_loras, rank or keys_dim."
            )

    @staticmethod
    def _check_init_fits(init, model_shapes, names) -> None:
        for name in names:
            stored = init.module(name)
            if (stored.in_features, stored.out_features) != model_shapes[name]:
                raise LoRWeBError(
                    f"--init {init.path}: module {name} is {stored.in_features} -> {stored.out_features} but the "
                    f"model's is {model_shapes[name][0]} -> {model_shapes[name][1]}. The basis was made for "
                    "another model; load the matching Kontext model or train from scratch."
                )

    def _optimizer(self, basis: TrainableBasis) -> torch.optim.Optimizer:
        train = self.config.train
        kwargs = dict(lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay)
        if train.optimizer == "adamw8bit" and self.device.type == "cuda":
            try:
                import bitsandbytes

                return bitsandbytes.optim.AdamW8bit(basis.parameters(), **kwargs)
            except ImportError:
                self.accelerator.print("bitsandbytes is not installed: using torch AdamW (32-bit states).")
        return torch.optim.AdamW(basis.parameters(), **kwargs)

    def _scheduler(self, optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        train = self.config.train
        total, warmup = train.steps, train.warmup_steps

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            if train.lr_scheduler == "linear":
                return max(0.0, 1.0 - progress)
            if train.lr_scheduler == "cosine":
                return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
            return 1.0

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    # ----------------------------------------------------------------------------------------------- batches
    def sample_generator(self, position: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + position)

    def example_at(self, position: int) -> str:
        count = len(self.train_files)
        epoch, within = divmod(position, count)
        if epoch not in self._permutations:
            seed = self.config.seed + 7919 * epoch
            self._permutations = {epoch: torch.randperm(count, generator=torch.Generator().manual_seed(seed))}
        return self.train_files[int(self._permutations[epoch][within])]

    def global_positions(self, step: int, micro: int) -> list[int]:
        start = (step * self.config.train.gradient_accumulation_steps + micro) * self.global_batch
        return list(range(start, start + self.global_batch))

    def make_batch(self, positions: list[int], *, randomise: bool = True) -> Batch:
        data = self.config.data
        samples = []
        for position in positions:
            cached = (
                self.cached[self.example_at(position)] if randomise else self.cached[self.validation_files[position]]
            )
            generator = self.sample_generator(position if randomise else -1 - position)
            swap = bool(torch.rand(1, generator=generator) < data.swap_probability) and randomise
            drop = bool(torch.rand(1, generator=generator) < data.caption_dropout) and randomise
            shape = tuple(cached.latents.shape[1:])
            forward, reverse = draw_noise(shape, generator), draw_noise(shape, generator)
            samples.append((cached, int(swap), drop, forward, reverse))
        return self._collate(samples)

    def _collate(self, samples: list) -> Batch:
        queries, latents, contexts, pooled, orientations, weights = [], {}, [], [], [], []
        for cached, orientation, drop, _, _ in samples:
            queries.append(self._query(cached, orientation))
            for slot, name in enumerate(GRID_ORDER):
                latents.setdefault(name, []).append(cached.latents[slot])
            context, vector = (self.empty_context, self.empty_pooled) if drop else (cached.context, cached.pooled)
            contexts.append(context)
            pooled.append(vector)
            orientations.append(orientation)
            weights.append(self._reverse_weight(cached.pair_only))
        length = max(c.shape[0] for c in contexts)
        contexts = [torch.nn.functional.pad(c, (0, 0, 0, length - c.shape[0])) for c in contexts]
        device = self.device
        return Batch(
            queries=torch.cat(queries).to(device),
            latents={name: torch.stack(values).to(device) for name, values in latents.items()},
            orientation=torch.tensor(orientations, device=device),
            context=torch.stack(contexts).to(device),
            pooled=torch.stack(pooled).to(device),
            forward_draw=self._draws([s[3] for s in samples]),
            reverse_draw=self._draws([s[4] for s in samples]),
            reverse_weight=torch.tensor(weights, dtype=torch.float32, device=device),
        )

    def _draws(self, draws: list) -> tuple:
        return torch.tensor([d.index for d in draws]), torch.stack([d.noise for d in draws]).to(self.device)

    def _query(self, cached: CachedExample, orientation: int) -> torch.Tensor:
        embeddings = dict(zip(_EMBEDDING_NAMES, cached.embeddings, strict=True))
        if orientation:  # a <-> a', b <-> b'
            embeddings = {"a": embeddings["a_prime"], "a_prime": embeddings["a"], "b": embeddings["b_prime"]}
        return combine_embeddings(self.basis.settings.query_mode, embeddings)

    def _reverse_weight(self, pair_only: bool) -> float:
        if self.reverse_default is None:
            return 1.0 if pair_only else 0.0
        return float(self.reverse_default)

    # ----------------------------------------------------------------------------------------------- loss
    def term_losses(self, batch: Batch, reverse: bool) -> torch.Tensor:
        """Per-sample loss ``[B]`` of the forward term (+dW, given grids) or LoRA Reverse (-dW, reversed grids)."""
        coefficients = self.model(batch.queries)
        self.injector.set_mix(coefficients, sign=-1.0 if reverse else 1.0)
        orientation = (1 - batch.orientation) if reverse else batch.orientation
        pick = orientation.view(-1, 1, 1, 1).bool()
        target = torch.where(pick, batch.latents["target_1"], batch.latents["target_0"])
        control = torch.where(pick, batch.latents["control_1"], batch.latents["control_0"])
        return self._denoising_loss(batch, target, control, batch.reverse_draw if reverse else batch.forward_draw)

    def train_step(self) -> float:
        """One optimiser step over the global batch (and its accumulation micro-batches); returns the global loss."""
        train = self.config.train
        total = torch.zeros((), device=self.device)
        rank = self.accelerator.process_index
        for micro in range(train.gradient_accumulation_steps):
            positions = self.global_positions(self.step, micro)
            needs_reverse = any(self._reverse_weight(self.pair_only[self.example_at(p)]) for p in positions)
            local = positions[rank * self.local_batch : (rank + 1) * self.local_batch]
            batch = self.make_batch(local)
            terms = [False, True] if needs_reverse else [False]
            for reverse in terms:  # one backward per term: the checkpoint recompute must see that term's mix
                per_sample = self.term_losses(batch, reverse)
                if reverse:
                    per_sample = per_sample * batch.reverse_weight
                loss = per_sample.mean() / train.gradient_accumulation_steps
                self.accelerator.backward(loss)
                self.injector.clear_mix()
                total = total + loss.detach()
        loss = float(self.accelerator.reduce(total, reduction="mean"))  # the same on every process
        if not math.isfinite(loss):
            self._diverged(f"the loss is {loss}")
        if train.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), train.max_grad_norm)
        fp16 = self.accelerator.mixed_precision == "fp16"
        if not fp16 and not _all_finite(p.grad for p in self.basis.parameters() if p.grad is not None):
            self._diverged("the gradients hold NaN or Inf values")
        self.optimizer.step()  # fp16: accelerate's grad scaler skips a step whose gradients overflowed
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if fp16 and self.accelerator.optimizer_step_was_skipped:
            self._skipped_step()
        else:
            self.skipped_in_a_row = 0
        if not _all_finite(self.basis.parameters()):
            self._diverged("the basis parameters became NaN or Inf after the update")
        return loss

    def _skipped_step(self) -> None:
        """fp16 overflow: the scaler lowers its scale and the step is skipped; endless overflow is divergence."""
        self.skipped_in_a_row += 1
        self.accelerator.print(f"step {self.step}: fp16 gradients overflowed; the update was skipped (scale lowered)")
        if self.skipped_in_a_row >= _MAX_SKIPPED_STEPS:
            self._diverged(f"{_MAX_SKIPPED_STEPS} fp16 steps in a row overflowed")

    def _diverged(self, what: str) -> None:
        """Stop before anything is saved: the last checkpoint written stays the newest good one."""
        raise LoRWeBError(
            f"the training diverged at step {self.step + 1}: {what}. Nothing was saved for this step; the last "
            f"checkpoint in {self.checkpoint_root} is kept. Lower train.lr (now {self.config.train.lr:g}), check "
            "the data and encoders, or use train.mixed_precision bf16, and start again (or --resume)."
        )

    @torch.no_grad()
    def validation_loss(self, files: list[str] | None = None) -> torch.Tensor:
        """Per-example forward-term loss on held-out examples, with fixed noise (comparable between runs)."""
        files = self.validation_files if files is None else files
        saved = self.validation_files
        self.validation_files = files
        try:
            losses = []
            for start in range(0, len(files), max(1, self.local_batch)):
                positions = list(range(start, min(len(files), start + max(1, self.local_batch))))
                batch = self.make_batch(positions, randomise=False)
                coefficients = self.basis(batch.queries)
                self.injector.set_mix(coefficients)
                losses.append(self._plain_losses(batch))
                self.injector.clear_mix()
            return torch.cat(losses).cpu()
        finally:
            self.validation_files = saved

    def _plain_losses(self, batch: Batch) -> torch.Tensor:
        target, control = batch.latents["target_0"], batch.latents["control_0"]
        return self._denoising_loss(batch, target, control, batch.forward_draw)

    def _denoising_loss(self, batch: Batch, target, control, draw) -> torch.Tensor:
        """The flow-matching loss of the model denoising ``target`` (conditioned on ``control``) at ``draw``."""
        indices, noise = draw
        sigmas = sigmas_for(indices).to(self.device)
        guidance = torch.full((target.shape[0],), self.config.train.guidance, device=self.device)
        with self.accelerator.autocast():
            prediction = self.backend.predict(
                noisy_latents(target, noise, sigmas), sigmas, batch.context, batch.pooled, guidance, control
            )
        return flow_matching_loss(
            prediction, target, noise, indices.to(self.device), self.config.train.timestep_weighting
        )

    @torch.no_grad()
    def coefficients_of(self, files: list[str]) -> torch.Tensor:
        """``[examples, modules, K]`` coefficients of cached examples (as given, not swapped)."""
        queries = torch.cat([self._query(self.cached[f], 0) for f in files]).to(self.device)
        coefficients = self.basis(queries)
        return torch.stack([coefficients[name] for name in self.basis.module_names], dim=1).cpu()

    # ----------------------------------------------------------------------------------------------- samples
    def sample_files(self) -> list[str]:
        """The analogies a sample sheet shows: held-out ones when there are any (they show generalisation)."""
        return (self.validation_files or self.train_files)[:_SAMPLE_ANALOGIES]

    @torch.no_grad()
    def render_samples(self, files: list[str]) -> list[list[torch.Tensor]]:
        """Per analogy the tiles ``[a, a', b, b']`` (``[H, W, 3]`` in 0..1), b' rendered with the current basis."""
        return [self._sample_inputs_of(path) + [self._render(path, row)] for row, path in enumerate(files)]

    def _sample_inputs_of(self, path: str) -> list[torch.Tensor]:
        """a, a', b decoded from the cached control grid [a | a'] / [b | b], not read from the source images: they
        go through the same VAE round trip and have the same size as the rendered b', so the sheet compares like
        with like (and needs no image file during training). Decoded once per analogy."""
        if path not in self._sample_inputs:
            control = self.cached[path].latents[GRID_ORDER.index("control_0")][None].to(self.device)
            quadrants = grid_quadrants(self.backend.decode_latents(control).float().cpu())
            self._sample_inputs[path] = [quadrants[k][0] for k in ("top_left", "top_right", "bottom_left")]
        return self._sample_inputs[path]

    def _render(self, path: str, row: int) -> torch.Tensor:
        """b' of one analogy: Euler sampling of the target grid from fixed noise, Kontext seeing the control grid,
        the basis mixed in exactly as the loss mixes it; the bottom-right quadrant of the decoded grid."""
        cached, device, train = self.cached[path], self.device, self.config.train
        control = cached.latents[GRID_ORDER.index("control_0")][None].to(device)
        context, pooled = cached.context[None].to(device), cached.pooled[None].to(device)
        guidance = torch.full((1,), train.sample_guidance, device=device)
        # its own generator: the same noise at every sheet (comparable between steps), no training RNG consumed
        generator = torch.Generator().manual_seed(self.config.seed + _SAMPLE_SEED_OFFSET + row)
        noise = torch.randn((1, *cached.latents.shape[1:]), generator=generator).to(device)

        def predict(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            with self.accelerator.autocast():
                return self.backend.predict(x, sigma, context, pooled, guidance, control)

        self.injector.set_mix(self.basis(self._query(cached, 0).to(device)))
        try:
            latents = euler_sample(predict, noise, sigma_schedule(train.sample_steps))
        finally:
            self.injector.clear_mix()  # the next training forward must start without this mix
        return bottom_right(self.backend.decode_latents(latents).float().cpu())[0]

    def write_samples(self) -> Path | None:
        """``<output_dir>/samples/step_N.png``: one row per analogy, columns a, a', b, b'. Main process only."""
        self.sampled_at = self.step
        if not self.accelerator.is_main_process:
            return None
        folder = Path(self.config.output_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{self.step:09d}.png"
        write_png(sample_sheet(self.render_samples(self.sample_files())), str(path))
        return path

    # ----------------------------------------------------------------------------------------------- loop
    def train(self, on_step_end: Callable[[Trainer], None] | None = None) -> str:
        """Run to ``train.steps``; returns the final basis path.

        SIGINT and SIGTERM stop the run after the step in progress, with a checkpoint of that step: it raises
        :class:`TrainingStopped` (a KeyboardInterrupt). A KeyboardInterrupt raised by ``on_step_end`` saves too."""
        config, accelerator = self.config, self.accelerator
        if accelerator.is_main_process:
            os.makedirs(config.output_dir, exist_ok=True)
            dump_config(config, os.path.join(config.output_dir, "train_config.yaml"))
        if config.train.log_with:
            accelerator.init_trackers(config.name)
        with StopRequest(self._stop_position, announce=accelerator.is_main_process) as stop:
            signum = self._run_steps(stop, on_step_end)
            if signum is not None:
                raise TrainingStopped(signum, self.step, self._checkpoint_of_this_step())
            if self.validation_files:
                self._record_validation()
            self.save_checkpoint()  # a signal now is deferred too: the final save is written whole
        if self.sample_every and self.sampled_at != self.step:
            self.write_samples()  # the end of training, unless its step already had a sheet
        accelerator.end_training()
        return self.final_basis_path

    def _run_steps(self, stop: StopRequest, on_step_end: Callable[[Trainer], None] | None) -> int | None:
        """The steps from ``self.step``; returns the signal that stopped them early (None when all ran)."""
        config, accelerator = self.config, self.accelerator
        bar = _progress(config.train.steps, self.step, accelerator.is_main_process)
        step_seconds: deque[float] = deque(maxlen=20)  # recent training steps only (not saving or sampling)
        try:
            while self.step < config.train.steps:
                signum = stop.agreed(accelerator)  # at a step boundary: the state is one finished step
                if signum is not None:
                    return signum
                self._phase = "step"
                began = time.perf_counter()
                loss = self.train_step()
                step_seconds.append(time.perf_counter() - began)
                self._phase = None
                self.losses.append((self.step, loss))
                if config.train.log_with:
                    accelerator.log({"loss": loss, "lr": self.scheduler.get_last_lr()[0]}, step=self.step)
                if bar is not None:
                    bar.set_postfix_str(progress_postfix(sum(step_seconds) / len(step_seconds), loss), refresh=False)
                    bar.update(1)
                if (
                    self.validation_files
                    and config.train.validation_every
                    and not self.step % config.train.validation_every
                ):
                    self._record_validation()
                if self.step % config.train.save_every == 0 and self.step < config.train.steps:
                    self.save_checkpoint()
                if self.sample_every and self.step % self.sample_every == 0:
                    self.write_samples()  # after the checkpoint: a failed render never costs a save
                if on_step_end is not None:
                    on_step_end(self)
        except KeyboardInterrupt:  # raised by code (on_step_end), or a signal outside the handlers' reach
            self._interrupted()
            raise
        finally:
            if bar is not None:
                bar.close()
        return None

    def _interrupted(self) -> None:
        """Save on a KeyboardInterrupt only between steps: inside a step or a save the state is no finished step."""
        if self._phase is not None:
            self.accelerator.print(
                f"\ninterrupted inside a {self._phase} after step {self.step}: no checkpoint was written for it; the "
                f"last complete one in {self.checkpoint_root} is kept"
            )
            return
        self.accelerator.print(f"\ninterrupted at step {self.step}: saving a checkpoint before exiting")
        self._checkpoint_of_this_step()

    def _stop_position(self) -> tuple[int, bool]:
        """For the signal handler: the step the run stops after, and whether a checkpoint is being written."""
        return self.step + (self._phase == "step"), self._phase == "save"

    def _checkpoint_of_this_step(self) -> Path:
        if self._saved_step == self.step:
            return self.checkpoint_root / _checkpoint_name(self.step)
        return self.save_checkpoint()

    def _record_validation(self) -> None:
        value = float(self.validation_loss().mean())
        self.validation_losses.append((self.step, value))
        if self.config.train.log_with:
            self.accelerator.log({"validation_loss": value}, step=self.step)

    def close(self) -> None:
        """Give the base model back as it was: hooks removed, blocks un-checkpointed, backend changes undone."""
        self.injector.detach()
        disable_gradient_checkpointing(self.backend.diffusion_model)
        self.backend.close()

    # ----------------------------------------------------------------------------------------------- saving
    @property
    def checkpoint_root(self) -> Path:
        return Path(self.config.output_dir) / "checkpoints"

    @property
    def final_basis_path(self) -> str:
        return os.path.join(self.config.output_dir, f"{self.config.name}.safetensors")

    def save_checkpoint(self) -> Path:
        """Accelerate state (basis, optimiser, scheduler, RNG) + trainer state + the basis in the released format.

        Written to ``step_N.tmp`` and renamed when complete, so an interrupted save never replaces a good one.
        """
        previous, self._phase = self._phase, "save"  # a signal now waits for the save (see StopRequest)
        try:
            final = self._write_checkpoint()
        finally:
            self._phase = previous
        self._saved_step = self.step
        return final

    def _write_checkpoint(self) -> Path:
        accelerator = self.accelerator
        dtype = _SAVE_DTYPES[self.config.train.save_dtype]  # a value can be finite in fp32 and overflow fp16
        if not _all_finite(p.detach().to(dtype) for p in self.basis.parameters()):  # never a NaN/Inf checkpoint
            raise LoRWeBError(
                f"the basis at step {self.step} holds NaN or Inf values as {self.config.train.save_dtype}, so no "
                f"checkpoint was written; the last one in {self.checkpoint_root} is kept. The training diverged: "
                "lower train.lr and check the data (or use train.save_dtype float32 if it only overflows float16)."
            )
        final = self.checkpoint_root / _checkpoint_name(self.step)
        temporary = final.with_name(final.name + ".tmp")
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(temporary))
        accelerator.wait_for_everyone()  # every process has written its RNG state before the folder is renamed
        if accelerator.is_main_process:
            state = {"step": self.step, "losses": self.losses, "validation_losses": self.validation_losses}
            (temporary / "trainer_state.json").write_text(json.dumps(state))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(temporary, final)
            self._prune_checkpoints()
            self._save_basis_files()
        accelerator.wait_for_everyone()
        return final

    def _save_basis_files(self) -> None:
        config = self.config
        dtype = _SAVE_DTYPES[config.train.save_dtype]
        extra = {"steps": self.step, "lr": config.train.lr, "batch_size": config.train.batch_size}
        step_file = os.path.join(config.output_dir, f"{config.name}_{self.step:09d}.safetensors")
        save_basis(self.basis, step_file, config.name, dtype=dtype, step=self.step, extra_train=extra)
        shutil.copyfile(step_file, self.final_basis_path + ".tmp")
        os.replace(self.final_basis_path + ".tmp", self.final_basis_path)
        step_files = sorted(Path(config.output_dir).glob(f"{config.name}_*.safetensors"))
        for old in step_files[: -config.train.keep_checkpoints]:
            old.unlink()
        write_loss_plot(self.losses, self.validation_losses, os.path.join(config.output_dir, "loss.png"))

    def _prune_checkpoints(self) -> None:
        complete = sorted(p for p in self.checkpoint_root.glob("step_*") if not p.name.endswith(".tmp"))
        for old in complete[: -self.config.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def latest_checkpoint(self) -> Path | None:
        complete = sorted(p for p in self.checkpoint_root.glob("step_*") if not p.name.endswith(".tmp"))
        return complete[-1] if complete else None

    def resume(self, checkpoint: str | os.PathLike | None = None) -> int:
        """Restore a checkpoint (the latest when None); returns the step it continues from.

        A damaged checkpoint is a message naming the newest whole one before it, never a silent fallback: the user
        decides whether to lose the steps in between."""
        path = Path(checkpoint) if checkpoint else self.latest_checkpoint()
        if path is None or not (path / STATE_FILE).is_file():
            raise LoRWeBError(
                f"no complete checkpoint to resume from in {self.checkpoint_root if path is None else path}. "
                "Start without --resume, or give a checkpoints/step_N folder."
            )
        problem = checkpoint_problem(path)
        if problem:
            raise self._damaged(path, problem, newest=checkpoint is None)
        state = read_trainer_state(path)
        self._load_accelerate_state(path, newest=checkpoint is None)
        self.step = int(state["step"])
        self.losses = [tuple(x) for x in state.get("losses", [])]
        self.validation_losses = [tuple(x) for x in state.get("validation_losses", [])]
        self._saved_step = self.step
        return self.step

    def _load_accelerate_state(self, path: Path, newest: bool) -> None:
        try:
            self.accelerator.load_state(str(path))
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as error:  # torch's "size mismatch for layers..." when the network differs
            if "size mismatch" not in str(error) and "Missing key" not in str(error):
                raise self._damaged(path, _short_error(error), newest) from None
            raise LoRWeBError(
                f"checkpoint {path} was trained with another network (K, rank, keys or modules) than this config's "
                f"({self.basis.num_loras} LoRAs, rank {self.basis.rank}, keys {self.basis.keys_dim}). Resume with "
                "the config that run used (its train_config.yaml), or start without --resume in another output_dir."
            ) from None
        except (OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError, SafetensorError) as error:
            raise self._damaged(path, _short_error(error), newest) from None

    def _damaged(self, path: Path, problem: str, newest: bool) -> LoRWeBError:
        which = "the newest checkpoint" if newest else "checkpoint"
        earlier = self._whole_checkpoint_before(path)
        instead = (
            f"Resume from the earlier complete checkpoint: --resume {earlier}, or start again"
            if earlier
            else "No earlier complete checkpoint is left: start again"
        )
        return LoRWeBError(
            f"{which} {path} is damaged ({problem}), so the run cannot continue from it. {instead} (without "
            f"--resume, in another output_dir)."
        )

    def _whole_checkpoint_before(self, path: Path) -> Path | None:
        """The newest checkpoint beside ``path`` and older than it whose files look whole."""
        siblings = sorted(p for p in path.parent.glob("step_*") if not p.name.endswith(".tmp") and p.name < path.name)
        return next((p for p in reversed(siblings) if checkpoint_problem(p) is None), None)


def _short_error(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}"


def _checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


#: tqdm's own rate is left out (its unit flips between step/s and s/step); the postfix gives seconds per step.
#: The remaining time comes before the postfix, so a narrow terminal trims the postfix, never the ETA.
PROGRESS_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"


def progress_postfix(seconds_per_step: float, loss: float) -> str:
    return f"{seconds_per_step:.2f} s/step, loss {loss:.4f}"


def _progress(total: int, start: int, main: bool):
    if not main:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=start, desc="LoRWeB training", unit="step", dynamic_ncols=True,
                bar_format=PROGRESS_FORMAT)  # fmt: skip
