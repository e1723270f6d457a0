"""The set of LoRAs a composition runs: ordinary LoRA files and analogies, in order, with their strengths."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SetEntry:
    """One LoRA of a set: an ordinary LoRA file (``state`` = its tensors) or an analogy (``basis`` + ``weights``)."""

    name: str
    kind: str  # "lora" | "analogy"
    strength: float
    state: object = None  # dict[str, Tensor] of the LoRA file
    basis: object = None  # LoraBasis
    weights: object = None  # MixWeights


@dataclass(frozen=True)
class LoraSet:
    """An ordered set of LoRAs. ``high_count``: how many leading entries are high-frequency (None: not profiled)."""

    entries: tuple[SetEntry, ...] = ()
    high_count: int | None = None
    scores: tuple[float, ...] | None = field(default=None, compare=False)

    def add(self, entry: SetEntry) -> LoraSet:
        if any(e.name == entry.name for e in self.entries):
            entry = SetEntry(**{**entry.__dict__, "name": f"{entry.name} #{len(self.entries) + 1}"})
        return LoraSet(self.entries + (entry,), None, None)

    def reordered(self, order: Sequence[int], high_count: int, scores: Sequence[float]) -> LoraSet:
        return LoraSet(tuple(self.entries[i] for i in order), high_count, tuple(scores))
