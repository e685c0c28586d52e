"""Tolerances for the tests that compare two code paths which compute the same numbers in another order.

Two paths that compute one function but order their sums differently (another batch composition, memory
layout, kernel or thread count: BLAS and oneDNN choose their blocking by these and by the CPU, so an AVX2
machine and an AVX-512 one round differently) agree to within rounding only, not bit for bit. Where a test
can make both paths compute the same thing (the same batch, layout, dtype and device) it asserts equality
instead; where it cannot, it uses a bound from here, derived from the arithmetic rather than measured on one
CPU.

Every floating-point operation is exact to within a relative ``u``, the unit roundoff (``unit_roundoff``:
2**-24 in float32, 2**-53 in float64). From it:

``sum_bound``: a sum of ``n`` terms is within ``(n - 1) u sum|terms|`` of the exact sum whatever the order
(Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., 2002, section 4.2, to first order in u),
so two orders differ by at most twice that. A worst case: it holds on every machine.

``network_tolerance``: a network's output depends on about ``LAYERS`` reductions (convolutions, linear
layers, norms, attention) of at most ``TERMS`` terms each. With the rounding errors independent and of mean
zero, Higham and Mary's probabilistic analysis ("A new approach to probabilistic rounding error analysis",
SIAM J. Sci. Comput. 41(5), 2019) bounds the error of ``n`` roundings by
``lam sqrt(n) u`` times the magnitude of what they round, except with probability at most
``2 n exp(-lam**2 / 2)``. With layers that keep their input's scale (normalised, as the tiny base's and SD2's
are), one path's output is within ``lam sqrt(LAYERS * TERMS) u * scale`` of the exact value, and two paths
within twice that; ``lam = 10`` makes the exception rarer than 1e-15 per compared number. For two paths in
float32 this is about 2e-3 of the output's scale (the cross-CPU difference seen in practice: 1e-5 on a unit normal); in
float64 about 3e-12, which is why the tests of batching and layout run in float64: there the bound is tight
enough to catch any real difference and still holds on every machine.
"""

from __future__ import annotations

import math

import torch

# The tiny base (tests' ``tiny_base``): its UNet has 197 conv, linear, norm and attention modules, the VAE
# encoder 21 and decoder 29 (247 in all); the longest reduction is a VAE GroupNorm's statistics over 4 channels
# of a 32 x 48 image (6144 terms; the convolutions sum at most 128 x 3 x 3 = 1152). Rounded up:
LAYERS = 250
TERMS = 8192
LAM = 10.0


def unit_roundoff(dtype) -> float:
    """``u``: half the gap between 1 and the next number of ``dtype`` (2**-24 for float32)."""
    return torch.finfo(dtype).eps / 2


def _scale(value) -> float:
    return float(value.detach().abs().max()) if isinstance(value, torch.Tensor) else float(abs(value))


def sum_bound(n: int, abs_sum, dtype=torch.float32) -> torch.Tensor | float:
    """How far two orders of summing ``n`` terms may differ: ``2 (n - 1) u sum|terms|`` (worst case)."""
    return 2 * (n - 1) * unit_roundoff(dtype) * abs_sum


def network_tolerance(scale, dtype, paths: int = 2, layers: int = LAYERS, terms: int = TERMS) -> float:
    """How far ``paths`` (2: two computations compared with each other; 1: one compared with an exact, e.g.
    float64, reference) computations of a network output whose magnitude is at most ``scale`` (a number, or
    the reference tensor: its largest |value|) may be apart, in ``dtype`` (module docstring)."""
    return paths * LAM * math.sqrt(layers * terms) * unit_roundoff(dtype) * _scale(scale)
