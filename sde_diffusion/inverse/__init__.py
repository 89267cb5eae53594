"""Linear inverse problems with a diffusion prior: reconstruct x from y = A·x + σ_y·z.

    obs = inverse.LinearObservation(A, y, noise_std)          # A: operator, (m, d) matrix or linear callable
    score = inverse.posterior_score(score_fn, sde, obs, method="mmps", cg_steps=3)
    x, nfe = sampling.sample(score, sde, shape, "heun")        # any sampler

Operators (operators.py): Matrix, Mask (inpainting), AveragePool (super-resolution), GaussianBlur, Function.
Methods (methods.py): dps, pigdm, mmps; `@register_method("name")` adds one. exact.py: the exact posterior of a
Gaussian-mixture prior, the oracle every method is measured against (BENCHMARKS.md "Inverse problems").
"""
from .exact import ExactPosterior, FullGaussianMixture, exact_posterior
from .methods import (DPS_REFERENCE_STEPS, METHODS, Linearization, conjugate_gradient, linearize, posterior_score,
                      register_method)
from .observation import LinearObservation
from .operators import (OPERATORS, AveragePool, Function, GaussianBlur, LinearOperator, Mask, Matrix, as_operator,
                        check_linear, register_operator)

__all__ = ["LinearObservation", "posterior_score", "register_method", "METHODS", "Linearization", "linearize",
           "conjugate_gradient", "DPS_REFERENCE_STEPS", "LinearOperator", "Matrix", "Mask", "AveragePool",
           "GaussianBlur", "Function", "as_operator", "check_linear", "OPERATORS", "register_operator",
           "exact_posterior", "ExactPosterior", "FullGaussianMixture"]
