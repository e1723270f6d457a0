"""Samples during training: the Euler sampler against closed forms, the sheets' steps, size, columns and pixels,
determinism, no effect on training, the refusal without a decoder, the progress bar's text and the loss plot."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_testing import pixel_images, pixel_latents, tiny_flux, training_config, write_quadruplets

import lorweb_ops
from lorweb_ops.errors import LoRWeBError
from lorweb_train.basis_module import save_basis
from lorweb_train.cache import fingerprint
from lorweb_train.config import config_from_mapping
from lorweb_train.data import read_dataset
from lorweb_train.plot import VALIDATION, write_loss_plot
from lorweb_train.sampling import (
    euler_sample,
    grid_quadrants,
    sample_sheet,
    shifted_sigma,
    sigma_schedule,
)
from lorweb_train.trainer import _SAMPLE_SEED_OFFSET, PROGRESS_FORMAT, Trainer, progress_postfix

QUADRANT = 16  # 32 px images at data.resolution 32: a 32 x 32 grid of 16 px quadrants


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_trainer(tmp: Path, data_path: Path, cache: Path, *, train: dict, **sections) -> Trainer:
    sections["data"] = sections.get("data", {}) | {"cache_dir": str(cache)}  # shared: encoded once per test
    config = training_config(tmp, data_path, train={"steps": 3} | train, **sections)
    return Trainer(config_from_mapping(config, "test config"))


def sheet_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


# ------------------------------------------------------------------------------------------------ pure maths
@pytest.mark.parametrize("steps", [1, 3, 20])
def test_euler_on_the_straight_flow_lands_on_x0(steps):
    """For x = (1 - s) x0 + s n the velocity is the constant n - x0, which Euler integrates exactly on any grid."""
    generator = torch.Generator().manual_seed(1)
    noise, x0 = torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 3, 4, 4, generator=generator)
    result = euler_sample(lambda x, sigma: noise - x0, noise, sigma_schedule(steps))
    torch.testing.assert_close(result, x0, rtol=0, atol=1e-5)
    # the same flow written as a field of x (v = (x - x0) / s): every Euler step stays on the line
    result = euler_sample(lambda x, sigma: (x - x0) / sigma.view(-1, 1, 1, 1), noise, sigma_schedule(steps))
    torch.testing.assert_close(result, x0, rtol=0, atol=1e-4)


def test_euler_on_a_linear_field_matches_its_closed_form():
    """dx/ds = x: Euler from s = 1 gives x(1) times the product of (1 + s_next - s) over the steps (independently
    computed in float64 here), and tends to the exact e^-1 x(1) as the steps grow."""
    start = torch.tensor([[1.0, -2.0, 0.5]])
    seen = []

    def predict(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        seen.append(float(sigma[0]))
        assert sigma.shape == (1,)
        return x

    sigmas = sigma_schedule(10).tolist()
    expected = math.prod(1.0 + (b - a) for a, b in zip(sigmas[:-1], sigmas[1:], strict=True))
    result = euler_sample(predict, start, sigma_schedule(10))
    torch.testing.assert_close(result, start * expected, rtol=1e-6, atol=0)
    assert seen == pytest.approx(sigmas[:-1])  # the model is asked at every sigma but the final 0
    fine = euler_sample(lambda x, sigma: x, start, sigma_schedule(100, shift=0.0))
    torch.testing.assert_close(fine, start * math.exp(-1), rtol=1e-2, atol=0)


def test_sigma_schedule_is_comfyuis_flux_simple_schedule():
    """ComfyUI's way, rebuilt: a 10000-entry table of e^1.15 / (e^1.15 + 1/t - 1) at t = i / 10000, the ``simple``
    scheduler's evenly spaced picks from its end, then 0."""
    table = [math.exp(1.15) / (math.exp(1.15) + 1 / (i / 10000) - 1) for i in range(1, 10001)]
    for steps in (1, 4, 20, 28):
        picks = [table[-(1 + int(x * len(table) / steps))] for x in range(steps)] + [0.0]
        schedule = sigma_schedule(steps)
        assert schedule.tolist() == pytest.approx(picks, rel=1e-12)
        assert schedule[0] == 1.0 and schedule[-1] == 0.0 and bool((schedule[1:] < schedule[:-1]).all())
    assert shifted_sigma(0.5) == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 1))
    with pytest.raises(ValueError):
        sigma_schedule(0)


def test_quadrants_and_sheet_layout():
    grid = torch.zeros(1, 4, 6, 3)
    grid[:, 2:, 3:] = 1.0  # bottom-right
    quadrants = grid_quadrants(grid)
    assert {k: tuple(v.shape) for k, v in quadrants.items()} == dict.fromkeys(quadrants, (1, 2, 3, 3))
    assert bool((quadrants["bottom_right"] == 1).all()) and float(grid.sum()) == quadrants["bottom_right"].sum()
    tiles = [torch.full((5, 7, 3), v) for v in (0.0, 0.25, 0.5, 1.0)]
    sheet = sample_sheet([tiles, tiles[::-1], tiles])
    assert sheet.size == (4 * 7, 3 * 5)
    assert sheet.getpixel((3 * 7, 5)) == (0, 0, 0) and sheet.getpixel((3 * 7, 0)) == (255, 255, 255)
    mixed = sample_sheet([[torch.ones(4, 4, 3)], [torch.ones(2, 6, 3)]], background=40)
    assert mixed.size == (6, 8) and mixed.getpixel((5, 0)) == (40, 40, 40)


def test_progress_bar_shows_seconds_per_step_loss_and_eta():
    assert progress_postfix(2.8149, 0.123456) == "2.81 s/step, loss 0.1235"
    assert PROGRESS_FORMAT.index("{remaining}") < PROGRESS_FORMAT.index("{postfix}")  # trimming keeps the ETA


def test_loss_plot_marks_and_labels_validation(tmp_path):
    losses = [(step, 1.0 / step) for step in range(1, 41)]
    path = str(tmp_path / "loss.png")
    write_loss_plot(losses, [(40, 0.5)], path)  # one point, at the last step: the usual case
    with Image.open(path) as plot:
        pixels = np.asarray(plot.convert("RGB"))
    orange = (pixels == np.array(VALIDATION, dtype=np.uint8)).all(-1)
    assert orange.sum() > 30  # a marker and its label, not a single dot
    write_loss_plot(losses, [], path)
    with Image.open(path) as plot:
        assert not (np.asarray(plot.convert("RGB")) == np.array(VALIDATION, dtype=np.uint8)).all(-1).any()


# ------------------------------------------------------------------------------------------------ in training
def test_sheets_appear_at_every_nth_step_and_at_the_end(tmp_path):
    write_quadruplets(tmp_path / "data", 2, seed=1)  # 4 examples, no validation split: the first 4 trained on
    cache = tmp_path / "cache"
    trainer = make_trainer(tmp_path / "run", tmp_path / "data", cache, train={"steps": 5, "sample_every": 2})
    samples = Path(trainer.config.output_dir) / "samples"
    seen = {}
    trainer.train(on_step_end=lambda t: seen.setdefault(t.step, sorted(p.name for p in samples.glob("*"))))
    assert seen == {1: [], 2: ["step_000000002.png"], 3: ["step_000000002.png"],
                    4: ["step_000000002.png", "step_000000004.png"],
                    5: ["step_000000002.png", "step_000000004.png"]}  # fmt: skip
    names = sorted(p.name for p in samples.glob("*"))
    assert names == ["step_000000002.png", "step_000000004.png", "step_000000005.png"]  # + the end, no .tmp
    assert sheet_pixels(samples / names[-1]).shape == (4 * QUADRANT, 4 * QUADRANT, 3)  # 4 analogies x 4 columns

    again = make_trainer(tmp_path / "even", tmp_path / "data", cache, train={"steps": 4, "sample_every": 2})
    again.train()
    assert sorted(p.name for p in (tmp_path / "even" / "out" / "samples").glob("*")) == [
        "step_000000002.png",
        "step_000000004.png",
    ]  # the last step already had its sheet


def test_sheets_show_held_out_analogies_with_their_inputs(tmp_path):
    """With a validation split the rows are the held-out analogies; the a, a', b columns are the example's images
    as the grid holds them (the tiny decoder inverts the tiny encoder exactly)."""
    write_quadruplets(tmp_path / "data", 3, seed=2)
    trainer = make_trainer(
        tmp_path / "run", tmp_path / "data", tmp_path / "cache",
        data={"validation_fraction": 0.34}, train={"steps": 1, "sample_every": 1},
    )  # fmt: skip
    assert len(trainer.validation_files) == 2 and trainer.sample_files() == trainer.validation_files
    trainer.train()
    pixels = sheet_pixels(Path(trainer.config.output_dir) / "samples" / "step_000000001.png")
    assert pixels.shape == (2 * QUADRANT, 4 * QUADRANT, 3)
    examples = {Path(trainer.config.cache_dir, "examples", f"{fingerprint(e, 32, trainer.backend)}.safetensors"): e
                for e in read_dataset(tmp_path / "data")}  # fmt: skip
    for row, path in enumerate(trainer.validation_files):
        example = examples[Path(path)]
        for column, role in enumerate(("a", "a_prime", "b")):
            with Image.open(example.sources[role]) as image:
                expected = np.asarray(image.convert("RGB").resize((QUADRANT, QUADRANT), Image.LANCZOS))
            tile = pixels[row * QUADRANT : (row + 1) * QUADRANT, column * QUADRANT : (column + 1) * QUADRANT]
            assert np.array_equal(tile, expected), f"row {row} column {role}"


def test_rendered_b_prime_is_one_euler_step_of_the_mixed_model(tmp_path):
    """sample_steps 1: b' = decode(noise - v(noise, sigma 1)), v from a tiny Flux whose weights carry the saved
    basis' dense delta (the inference library's patch, not the training hooks), conditioned on the control grid,
    the instruction's encoding and guidance 2.5, bottom-right quadrant."""
    write_quadruplets(tmp_path / "data", 1, seed=3)
    trainer = make_trainer(tmp_path / "run", tmp_path / "data", tmp_path / "cache",
                           train={"steps": 1, "sample_every": 1, "sample_steps": 1})  # fmt: skip
    with torch.no_grad():
        for parameter in trainer.basis.parameters():
            parameter.normal_(0, 0.3, generator=torch.Generator().manual_seed(parameter.numel()))
    path = trainer.sample_files()[0]
    rendered = trainer.render_samples([path])[0][3]
    assert trainer.injector._coefficients is None  # cleared after rendering
    loaded = lorweb_ops.load_basis(
        save_basis(trainer.basis, str(tmp_path / "now.safetensors"), "now", dtype=torch.float32), use_cache=False
    )
    cached = trainer.cached[path]
    coefficients = lorweb_ops.mixing_coefficients(loaded, trainer._query(cached, 0))
    model = tiny_flux(**trainer.config.model.backend_options)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith(("double_blocks", "single_blocks")):
                module.weight += lorweb_ops.flux_delta(loaded, coefficients, name)
        generator = torch.Generator().manual_seed(trainer.config.seed + _SAMPLE_SEED_OFFSET)  # row 0's noise
        noise = torch.randn((1, *cached.latents.shape[1:]), generator=generator)
        velocity = model(noise, torch.ones(1), cached.context[None], y=cached.pooled[None],
                         guidance=torch.tensor([2.5]), ref_latents=[cached.latents[1][None]])  # fmt: skip
    expected = pixel_images(noise - velocity)[0, QUADRANT:, QUADRANT:]
    torch.testing.assert_close(rendered, expected, rtol=0, atol=1e-4)
    plain = trainer.render_samples([path])[0][3]
    assert torch.equal(plain, rendered)  # rendering twice gives the same pixels
    with torch.no_grad():
        for parameter in trainer.basis.parameters():
            parameter.zero_()
    assert not torch.allclose(trainer.render_samples([path])[0][3], rendered, atol=1e-3)  # the mix is used


def test_sampling_is_deterministic_and_leaves_training_bit_identical(tmp_path):
    write_quadruplets(tmp_path / "data", 2, seed=1)
    cache, runs = tmp_path / "cache", {}
    for name, every in (("on", 1), ("again", 1), ("off", 0)):
        trainer = make_trainer(tmp_path / name, tmp_path / "data", cache,
                               data={"caption_dropout": 0.5}, train={"steps": 3, "sample_every": every})  # fmt: skip
        trainer.train()
        runs[name] = (trainer.losses, load_file(trainer.final_basis_path), Path(trainer.config.output_dir))
    for name in ("again", "off"):
        assert runs[name][0] == runs["on"][0]  # the same losses, bit for bit
        assert all(torch.equal(runs[name][1][k], runs["on"][1][k]) for k in runs["on"][1])
    sheets = sorted((runs["on"][2] / "samples").glob("*.png"))
    assert [p.name for p in sheets] == [f"step_00000000{s}.png" for s in (1, 2, 3)]
    for sheet in sheets:
        assert np.array_equal(sheet_pixels(sheet), sheet_pixels(runs["again"][2] / "samples" / sheet.name))
    assert not np.array_equal(sheet_pixels(sheets[0]), sheet_pixels(sheets[-1]))  # b' follows the training
    assert not (runs["off"][2] / "samples").exists()


def test_sampling_needs_a_decoder_and_auto_is_off_on_the_cpu(tmp_path):
    write_quadruplets(tmp_path / "data", 1, seed=1)
    no_decoder = {"backend_options": {"seed": 0, "decode": False}}
    with pytest.raises(LoRWeBError, match=r"train.sample_every is 5 .* no decode_latents"):
        make_trainer(tmp_path / "a", tmp_path / "data", tmp_path / "cache", train={"sample_every": 5},
                     model=no_decoder)  # fmt: skip
    assert not (tmp_path / "cache" / "examples").exists()  # refused before anything was encoded
    auto = make_trainer(tmp_path / "b", tmp_path / "data", tmp_path / "cache", train={"steps": 1})
    assert auto.config.train.sample_every == -1 and auto.sample_every == 0
    assert auto.backend.decode_latents is None  # no samples: the decoder is not kept
    auto.train()
    assert not (Path(auto.config.output_dir) / "samples").exists()
    quiet = make_trainer(tmp_path / "c", tmp_path / "data", tmp_path / "cache", train={"sample_every": 0},
                         model=no_decoder)  # fmt: skip
    assert quiet.sample_every == 0


def test_auto_is_250_on_cuda_when_the_backend_decodes():
    """``Trainer._sample_interval`` on its own (no GPU here): auto on CUDA, with and without a decoder."""
    from types import SimpleNamespace

    printed = []
    for decoder, expected in ((pixel_images, 250), (None, 0)):
        fake = SimpleNamespace(
            config=SimpleNamespace(train=SimpleNamespace(sample_every=-1)),
            backend=SimpleNamespace(decode_latents=decoder, description="custom"),
            device=torch.device("cuda"),
            accelerator=SimpleNamespace(print=printed.append),
        )
        assert Trainer._sample_interval(fake) == expected
    assert len(printed) == 1 and "no VAE decoder" in printed[0]  # auto without a decoder says why, once


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("sample_every", -2, "train.sample_every must be"),
        ("sample_steps", 0, r"train.sample_steps must be within 1..100"),
        ("sample_steps", 101, r"train.sample_steps must be within 1..100"),
        ("sample_guidance", float("nan"), "train.sample_guidance"),
    ],
)
def test_sample_keys_are_validated(tmp_path, key, value, message):
    with pytest.raises(LoRWeBError, match=message):
        config_from_mapping(training_config(tmp_path, tmp_path, train={key: value}), "test config")


def test_pixel_decoder_inverts_the_pixel_encoder():
    images = torch.rand(2, 8, 6, 3)
    torch.testing.assert_close(pixel_images(pixel_latents(images)), images, rtol=0, atol=1e-6)


def test_comfyui_decoder_undoes_the_latent_shift_and_scale():
    """The ComfyUI glue's vae_decoder with stand-ins for ComfyUI's model and VAE (Flux's latent format numbers):
    decoding what the glue's encoder produced gives the images back, alpha dropped, on the CPU."""
    from lorweb_train.backends.comfyui import vae_decoder

    class FluxLatents:
        scale, shift = 0.3611, 0.1159

        def process_latent_in(self, z):
            return (z - self.shift) * self.scale

        def process_latent_out(self, z):
            return z / self.scale + self.shift

    class PixelVAE:
        def encode(self, images):
            return pixel_latents(images[..., :3])

        def decode(self, latents):  # ComfyUI: channels last, 0..1; may carry a fourth channel
            return torch.cat([pixel_images(latents), torch.ones(*pixel_images(latents).shape[:3], 1)], -1)

    model, vae = FluxLatents(), PixelVAE()
    images = torch.rand(1, 8, 8, 3)
    decoded = vae_decoder(model, vae)(model.process_latent_in(vae.encode(images)))
    assert decoded.shape == images.shape and decoded.device.type == "cpu"
    torch.testing.assert_close(decoded, images, rtol=0, atol=1e-5)
