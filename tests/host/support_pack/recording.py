"""Test-only output node: records every (weights, samples) it is called with, so list execution can be counted."""

from __future__ import annotations

#: one entry per call: {"coefficients": [modules, K] tensor, "samples": latent tensor}
RECORDS: list[dict] = []


class RecordMix:
    """Keeps the coefficients an Apply used and the latent sampled with its model; one record per call."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"weights": ("LORWEB_WEIGHTS",), "samples": ("LATENT",)}}

    RETURN_TYPES = ()
    FUNCTION = "record"
    OUTPUT_NODE = True
    CATEGORY = "lorweb_tests"

    def record(self, weights, samples):
        RECORDS.append({"coefficients": weights.as_matrix().clone(), "samples": samples["samples"].clone()})
        return {"ui": {"recorded": [len(RECORDS)]}}
