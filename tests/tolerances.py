"""Tolerances derived from float32 arithmetic, for tests that compare two computations of the same quantity.

Two float32 evaluations of one sum of ``n`` terms that differ only in the order or grouping of the additions
(a batch of 4 vs 2 micro-batches of 2, one process vs two averaged by DDP, a BLAS kernel blocked differently on
another machine or thread count) differ by rounding alone. Each addition rounds with a relative error of at most
the unit roundoff ``u = 2**-24``. In the worst case the error of a sum grows as ``(n - 1) u sum|t_i|`` (Higham,
*Accuracy and Stability of Numerical Algorithms*, 2nd ed., §4.2); with rounding errors that behave as independent,
zero-mean variables it grows as ``lambda sqrt(n) u sum|t_i|``, exceeded with probability at most
``2 exp(-lambda**2 / 2)`` (Higham & Mary, SIAM J. Sci. Comput. 41(5), 2019). We take ``lambda = 8`` (a chance
below 1e-13 per element) and the largest magnitude of the compared tensor as its scale, so the bound is
``8 sqrt(n) u max|x|``: a few ulps of the largest value times sqrt(n). It does not depend on the machine, and it
is many orders of magnitude below what a real mistake changes (a factor of 2, a missing term).
"""

from __future__ import annotations

import math

import torch

UNIT_ROUNDOFF = 2.0**-24  # float32
LAMBDA = 8.0


def reordered_sum_tolerance(terms: int, scale: float) -> float:
    """The absolute bound for two float32 evaluations of one sum of ``terms`` terms of magnitude up to ``scale``."""
    return LAMBDA * math.sqrt(terms) * UNIT_ROUNDOFF * scale


def assert_reordered_close(actual: torch.Tensor, expected: torch.Tensor, terms: int, what: str) -> float:
    """Assert ``actual`` equals ``expected`` up to the reordered-sum bound; returns the worst |difference| / bound."""
    scale = float(expected.detach().abs().max())
    bound = reordered_sum_tolerance(terms, scale)
    worst = float((actual.detach() - expected.detach()).abs().max())
    assert worst <= bound, (
        f"{what}: max |difference| {worst:.3g} exceeds the float32 reordering bound {bound:.3g} "
        f"(8 sqrt({terms}) u max|x|, max|x| = {scale:.3g})"
    )
    return worst / bound if bound else 0.0


def adam_first_step_tolerance(
    gradient: torch.Tensor, gradient_bound: float, parameter: torch.Tensor, lr: float, eps: float
) -> torch.Tensor:
    """Per-element bound on the parameter difference after AdamW's first step, given gradients within ``bound``.

    After one step the bias-corrected moments are ``m = g`` and ``sqrt(v) = |g|``, so the update is
    ``lr * f(g)`` with ``f(g) = g / (|g| + eps)`` (weight decay acts on the same parameters in both runs).
    ``|f'(g)| = eps / (|g| + eps)**2``, so a gradient error ``d <= bound`` moves the update by at most
    ``lr * d * eps / (max(|g| - d, 0) + eps)**2``, and never by more than ``2 lr`` (f lies in (-1, 1)): where
    ``|g|`` is itself rounding noise, the sign of the step may flip. Plus the roundings of the step (4 ulps of
    ``lr``) and of the new value (2 ulps of the parameter).
    """
    magnitude = (gradient.abs() - gradient_bound).clamp(min=0)
    slope_bound = gradient_bound * eps / (magnitude + eps) ** 2
    return lr * (slope_bound.clamp(max=2.0) + 4 * UNIT_ROUNDOFF) + 2 * UNIT_ROUNDOFF * parameter.abs()
