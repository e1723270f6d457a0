"""The flow-matching loss as the reference (ai-toolkit ``flowmatch``, ``timestep_type: weighted``) computes it.

* timesteps: ``linspace(1000, 1, 1000)``; an index drawn uniformly from ``[0, 999)``; ``sigma = t / 1000``;
* noisy latents ``(1 - sigma) x0 + sigma noise``; target ``noise - x0``; Flux gets ``sigma`` as its timestep;
* per-element MSE times the timestep weight, mean over C, H, W per sample. The reference's ``weighted`` type ends
  up using the bell-shaped, mean-normalised table (its ``weighted`` branch is overwritten by that table), so that
  is what ``weighted`` means here too.
* Kontext: the clean control grid's latent goes in as the reference latent; the loss covers the whole target grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NUM_TIMESTEPS = 1000


def timestep_table() -> torch.Tensor:
    """The reference's training timesteps, 1000 down to 1."""
    return torch.linspace(NUM_TIMESTEPS, 1, NUM_TIMESTEPS)


def bell_weights() -> torch.Tensor:
    """Bell-shaped weights over timestep indices, shifted to a minimum of 0 and scaled to mean 1."""
    x = torch.arange(NUM_TIMESTEPS, dtype=torch.float32)
    y = torch.exp(-2 * ((x - NUM_TIMESTEPS / 2) / NUM_TIMESTEPS) ** 2)
    shifted = y - y.min()
    return shifted * (NUM_TIMESTEPS / shifted.sum())


@dataclass(frozen=True)
class NoiseDraw:
    """One sample's random draw: timestep index and noise (from that sample's own generator)."""

    index: int
    noise: torch.Tensor


def draw_noise(latent_shape: tuple[int, ...], generator: torch.Generator) -> NoiseDraw:
    index = int(torch.randint(0, NUM_TIMESTEPS - 1, (1,), generator=generator))
    return NoiseDraw(index, torch.randn(latent_shape, generator=generator))


def sigmas_for(indices: torch.Tensor) -> torch.Tensor:
    return timestep_table()[indices] / NUM_TIMESTEPS


def flow_matching_loss(
    prediction: torch.Tensor,
    latents: torch.Tensor,
    noise: torch.Tensor,
    indices: torch.Tensor,
    weighting: str = "weighted",
) -> torch.Tensor:
    """Per-sample loss ``[B]``: mean over (C, H, W) of ``w(t) (prediction - (noise - latents))^2``."""
    target = (noise - latents).float()
    per_element = (prediction.float() - target) ** 2
    if weighting == "weighted":
        per_element = per_element * bell_weights().to(per_element.device)[indices].view(-1, 1, 1, 1)
    return per_element.mean(dim=(1, 2, 3))


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    sigma = sigmas.to(latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
    return (1.0 - sigma) * latents + sigma * noise
