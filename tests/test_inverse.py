"""Inverse problems (sde_diffusion.inverse) against exact answers: operators' adjoints, the exact posterior of a
Gaussian-mixture prior, posterior scores that are exact where the theory says so, and samples scored against the
exact posterior."""
import math

import pytest
import torch

from sde_diffusion import inverse, sampling, toy
from sde_diffusion.sdes import EDMSDE, VPSDE

pytestmark = pytest.mark.usefixtures("one_thread")
IMAGE = (2, 4, 6)


def operators():
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(IMAGE, generator=g) < 0.5
    return {
        "matrix": inverse.Matrix(torch.randn(5, math.prod(IMAGE), generator=g, dtype=torch.float64), IMAGE),
        "mask": inverse.Mask(keep),
        "mask (H, W)": inverse.Mask(keep[0], IMAGE),
        "pool": inverse.AveragePool(2, IMAGE),
        "blur": inverse.GaussianBlur(0.8, IMAGE),
        "function": inverse.Function(lambda x: x[:, :1].flip(-1) - 2 * x[:, 1:], IMAGE),
    }


@pytest.mark.parametrize("name", list(operators()))
def test_each_operator_is_linear_and_its_adjoint_is_its_transpose(name):
    A = operators()[name]
    g = torch.Generator().manual_seed(1)
    inverse.check_linear(A, g)
    x = torch.randn(3, *IMAGE, generator=g, dtype=torch.float64)
    v = torch.randn(3, *A.out_shape(), generator=g, dtype=torch.float64)
    assert torch.allclose((A(x) * v).sum(), (x * A.adjoint(v)).sum(), rtol=1e-10)
    M = A.matrix()
    assert torch.allclose(A(x).flatten(1), x.flatten(1) @ M.T, atol=1e-12)
    assert torch.allclose(A.adjoint(v).flatten(1), v.flatten(1) @ M, atol=1e-12)


def test_builtin_operators_measure_what_they_say():
    x = torch.arange(2 * 4 * 6, dtype=torch.float64).reshape(1, *IMAGE)
    assert inverse.AveragePool(2, IMAGE)(x)[0, 1, 0, 0] == x[0, 1, :2, :2].mean()
    blur = inverse.GaussianBlur(0.8, (1, 10, 10))  # radius 3
    ones = torch.ones(1, 1, 10, 10, dtype=torch.float64)
    assert torch.allclose(blur(ones)[0, 0, 3:-3, 3:-3], torch.ones(4, 4, dtype=torch.float64))  # kernel sums to 1
    assert blur(ones)[0, 0, 0, 0] < 0.8  # zero padding at the border
    hole = inverse.OPERATORS.parse("inpaint:box=0.5")[0].fn((1, 8, 8), box=0.5)
    assert hole.out_shape() == (64 - 16,) and hole(torch.ones(1, 1, 8, 8)).sum() == 48
    assert inverse.OPERATORS.get("super_resolution").fn((3, 8, 8), factor=4).out_shape() == (3, 2, 2)


def test_operator_and_observation_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match="divisible"):
        inverse.AveragePool(3, (1, 8, 8))
    with pytest.raises(ValueError, match="columns"):
        inverse.Matrix(torch.ones(2, 5), (2, 3))
    with pytest.raises(ValueError, match=r"shaped \(3,\)"):
        inverse.LinearObservation(torch.ones(3, 4), torch.ones(2), 0.1)
    with pytest.raises(ValueError, match="shape of one sample"):
        inverse.LinearObservation(lambda x: x, torch.ones(2), 0.1)
    with pytest.raises(ValueError, match="not linear"):
        inverse.check_linear(inverse.Function(lambda x: x**2, (3,)))
    with pytest.raises(ValueError, match="noise_std"):
        inverse.LinearObservation(torch.ones(1, 2), torch.ones(1), -0.1)


# ------------------------------------------------------------------------------------------------
# The exact posterior
# ------------------------------------------------------------------------------------------------
def observe(prior, m, noise_std, seed=0):
    """A random (m, d) measurement of one prior draw."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, prior.dim, generator=g, dtype=torch.float64) / math.sqrt(prior.dim)
    x = inverse.FullGaussianMixture.from_prior(prior).sample(1, g)[0]
    return inverse.LinearObservation(A, A @ x[0] + noise_std * torch.randn(m, generator=g, dtype=torch.float64),
                                     noise_std)


def test_exact_posterior_is_prior_times_likelihood():
    """log p(x | y) − log p(x) − log N(y; A·x, σ_y²·I) is the same constant (−log p(y)) at every x."""
    prior = toy.random_mixture(3)
    obs = observe(prior, 3, 0.2)
    post = inverse.exact_posterior(prior, obs)
    x = torch.randn(50, prior.dim, dtype=torch.float64) + prior.means[0]
    log_lik = -0.5 * (obs.residual_norm(x) / obs.noise_std) ** 2
    const = post.log_prob(x) - prior.log_prob(x) - log_lik
    assert const.std() < 1e-9 * const.abs().mean()
    wrong = inverse.exact_posterior(prior, inverse.LinearObservation(obs.A, obs.y, 2 * obs.noise_std))
    assert (wrong.log_prob(x) - prior.log_prob(x) - log_lik).std() > 1e-2


def test_noiseless_posterior_of_a_gaussian_is_its_conditional():
    prior, mask, x_known = toy.inpainting_oracle()
    obs = inverse.LinearObservation(inverse.Mask(mask), x_known[mask], 0.0)
    post = inverse.exact_posterior(prior, obs)
    mean, cov = prior.conditional(mask, x_known[mask])
    draws = post.sample(4, torch.Generator().manual_seed(0))
    assert torch.allclose(draws[:, mask], x_known[mask].expand(4, -1), atol=1e-12)  # on the plane A·x = y
    basis = post.basis  # coordinates along the unknown entries
    assert torch.allclose(post.mixture.means[0], basis[~mask].T @ mean, atol=1e-10)
    assert torch.allclose(post.mixture.covs[0], basis[~mask].T @ cov @ basis[~mask], atol=1e-10)


# ------------------------------------------------------------------------------------------------
# Posterior scores
# ------------------------------------------------------------------------------------------------
TIMES = (0.02, 0.2, 0.5, 0.9)


def score_errors(prior, obs, sde, method, **options):
    """Relative errors of the method's posterior score against the exact one at TIMES (fractions of T)."""
    exact = inverse.exact_posterior(prior, obs).score_fn(sde)
    approx = inverse.posterior_score(prior.marginal_score_fn(sde), sde, obs, method, **options)
    g = torch.Generator().manual_seed(7)
    errors = []
    for fraction in TIMES:
        t = torch.tensor(fraction * sde.t_max, dtype=torch.float64)
        x = sde.alpha(t) * prior.mean + sde.sigma(t) * torch.randn(6, prior.dim, generator=g, dtype=torch.float64)
        errors.append(((approx(x, t) - exact(x, t)).norm() / exact(x, t).norm()).item())
    return errors


@pytest.mark.parametrize("sde", [VPSDE(), EDMSDE()], ids=["vp", "edm"])
def test_mmps_posterior_score_is_exact_for_a_gaussian_prior(sde):
    prior = toy.ar1_gaussian(6)
    obs = observe(prior, 3, 0.1)
    assert max(score_errors(prior, obs, sde, "mmps", cg_steps=3)) < 1e-8
    assert max(score_errors(prior, obs, sde, "mmps", cg_steps=1)) > 1e-3  # one CG step: not yet the solve
    assert max(score_errors(prior, obs, sde, "pigdm")) > 1e-2  # ΠGDM's isotropic covariance is wrong here


def test_pigdm_is_exact_for_an_isotropic_gaussian_prior_with_its_std():
    prior = toy.Gaussian(torch.full((5,), 0.3, dtype=torch.float64), 0.25 * torch.eye(5, dtype=torch.float64))
    obs = inverse.LinearObservation(inverse.Mask(torch.tensor([1, 0, 1, 0, 0])), torch.tensor([0.9, -0.2]), 0.1)
    sde = VPSDE()
    assert max(score_errors(prior, obs, sde, "pigdm", data_std=0.5)) < 1e-8
    assert max(score_errors(prior, obs, sde, "pigdm", data_std=1.0)) > 1e-2
    assert max(score_errors(prior, obs, sde, "mmps", cg_steps=2)) < 1e-8


def test_user_registered_method_and_option_errors():
    @inverse.register_method("prior_only_test", replace=True)
    def prior_only(lin, *, scale: float = 0.0):
        return scale * lin.vjp(lin.residual)

    prior, sde = toy.ar1_gaussian(4), VPSDE()
    obs = observe(prior, 2, 0.1)
    score = inverse.posterior_score(prior.marginal_score_fn(sde), sde, obs, "prior_only_test")
    x, t = torch.randn(3, 4, dtype=torch.float64), torch.tensor(0.3)
    assert torch.equal(score(x, t), prior.marginal_score_fn(sde)(x, t))
    spec = inverse.posterior_score(prior.marginal_score_fn(sde), sde, obs, "prior_only_test:scale=1")
    assert not torch.allclose(spec(x, t), score(x, t))
    with pytest.raises(ValueError, match="has no option 'cg'"):
        inverse.posterior_score(prior.marginal_score_fn(sde), sde, obs, "mmps", cg=2)
    with pytest.raises(ValueError, match="unknown inverse method 'mmsp'.*did you mean 'mmps'"):
        inverse.posterior_score(prior.marginal_score_fn(sde), sde, obs, "mmsp")
    noiseless = inverse.LinearObservation(obs.A, obs.y, 0.0)
    with pytest.raises(ValueError, match="noise_std is 0"):
        inverse.posterior_score(prior.marginal_score_fn(sde), sde, noiseless, "dps", step="likelihood")
    with pytest.raises(ValueError, match="already registered"):
        inverse.register_method("mmps")(prior_only)


# ------------------------------------------------------------------------------------------------
# Samples against the exact posterior
# ------------------------------------------------------------------------------------------------
def posterior_samples(prior, obs, method, n=1000, steps=25, sampler="dpm_solver", **options):
    sde = VPSDE()
    score = inverse.posterior_score(prior.marginal_score_fn(sde), sde, obs, method, **options)
    x, _ = sampling.sample(score, sde, (n, prior.dim), sampler, steps=steps, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(3))
    return x


def test_mmps_samples_a_gaussian_posterior_exactly():
    """Gaps over observation seeds 0–4: −0.006…−0.002 with 3 CG steps, 0.04…0.14 with 1."""
    prior = toy.ar1_gaussian(6)
    obs = observe(prior, 3, 0.1)
    post = inverse.exact_posterior(prior, obs)
    entropy = post.entropy()
    gap = post.gap(posterior_samples(prior, obs, "mmps", cg_steps=3), entropy)
    assert abs(gap) < 0.03, gap
    assert post.gap(posterior_samples(prior, obs, "mmps", cg_steps=1), entropy) > 0.03  # an inexact solve shows (0.07)


def test_mmps_beats_dps_on_a_mixture():
    """Over toy.random_mixture seeds 0–7 (d = 2…64, m = d/2, σ_y = 0.1): mmps's gap −0.002…0.27 and sliced W₂
    0.01…0.49, DPS's (ζ = 1) 6.8…17000 and 0.4…27. Here seed 1 (d = 4): 0.033 / 0.034 against 26 / 0.64."""
    prior = toy.random_mixture(1)
    obs = observe(prior, prior.dim // 2, 0.1, seed=1)
    post = inverse.exact_posterior(prior, obs)
    entropy = post.entropy()
    scores = {method: (post.gap(x, entropy), post.sliced_w2(x)) for method in ("mmps", "dps")
              for x in [posterior_samples(prior, obs, method, n=600)]}
    assert scores["mmps"][0] < 0.3 and scores["mmps"][0] < scores["dps"][0] / 10, scores
    assert scores["mmps"][1] < scores["dps"][1] / 3, scores


def test_conjugate_gradient_solves_and_stops_at_negative_curvature():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(4, 5, 5, generator=g, dtype=torch.float64)
    M = M @ M.transpose(1, 2) + 0.1 * torch.eye(5, dtype=torch.float64)  # one SPD matrix per sample
    b = torch.randn(4, 5, generator=g, dtype=torch.float64)
    u = inverse.conjugate_gradient(lambda v: (M @ v[..., None])[..., 0], b, steps=5)
    torch.testing.assert_close(u, torch.linalg.solve(M, b), rtol=1e-8, atol=1e-8)  # exact in d steps
    indefinite = torch.tensor([1.0, -1e-3], dtype=torch.float64)  # its second direction has negative curvature
    u = inverse.conjugate_gradient(lambda v: indefinite * v, torch.ones(1, 2, dtype=torch.float64), steps=2)
    assert u.norm() < 3  # plain CG: the second step divides by −0.002: ‖u‖ = 1000
