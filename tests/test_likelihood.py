"""Likelihoods (sde_diffusion.likelihood) against exact oracles.

A Gaussian mixture diffused by any of our SDEs is again a Gaussian mixture, so `toy.GaussianMixture` gives the
exact score of p_t and the exact density log p_t at every t. With that score the probability-flow ODE maps
p_eps onto p_T exactly, which is what makes the ODE likelihood checkable to solver precision.
Everything runs in float64 on one thread (the tensors are tiny; thread start-up would dominate).
"""
import math

import pytest
import scipy.integrate
import torch

import paper_losses  # tests/: the losses as the papers write them

from sde_diffusion import likelihood as L
from sde_diffusion import losses
from sde_diffusion.config import ConfigError, default_config, validate_config
from sde_diffusion.data.datasets import ImageDataset
from sde_diffusion.discrete import chain_for
from sde_diffusion.sdes import SubVPSDE, VESDE, VPSDE
from sde_diffusion.toy import GaussianMixture, default_mixture, high_dim_mixture

SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}
EPS = L.DEFAULT_EPS
ODE_TOL_BITS = 0.01  # the bound on |bits/dim error| of the exact-divergence ODE likelihood
BPD_TOL_BITS = 2e-3  # bits_per_dim vs the oracle: below log2(256/255) = 0.0056, so a K−1-for-K offset fails
SOLVER_SLACK_BITS = 1e-3  # solver error allowed on top of 3 standard errors in the Hutchinson checks
GAUSSIAN = GaussianMixture([1.0], [[0.3, -0.2]], 0.5)  # the single Gaussian N(μ, 0.5² I), d = 2


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def mixture(d: int) -> GaussianMixture:
    return default_mixture() if d == 2 else high_dim_mixture(d)


def coefficients(sde, t):
    t = torch.tensor(float(t), dtype=torch.float64)
    return sde.alpha(t), sde.sigma(t)


def points(mix, n, seed=0):
    return mix.sample(n, torch.Generator().manual_seed(seed))[0].double()


def ode_error_bits(sde, mix, x, divergence="exact", generator=None):
    """Per-example error of `log_likelihood` in bits/dim against the exact log p_eps(x), and the nfe.

    The ODE returns log π(z) + ∫∇·v. For the exact score the flow carries p_eps onto p_T, so
    log p_eps(x) = log p_T(z) + ∫∇·v exactly, i.e. logp = log p_eps(x) + [log π(z) − log p_T(z)]: the known
    prior mismatch (up to 0.018 bits/dim here for VE, d = 2 — larger than the tolerance) is removed with the
    exact p_T of the mixture, and what remains is solver and divergence error alone.
    """
    logp, z, nfe = L.log_likelihood(mix.marginal_score_fn(sde), sde, x, divergence=divergence, generator=generator)
    mismatch = sde.prior_logp(z) - mix.log_prob(z, *coefficients(sde, sde.T))
    error = logp - mismatch - mix.log_prob(x, *coefficients(sde, EPS))
    return error / (mix.dim * L.LN2), nfe


# --------------------------------------------------------------------------------------------------
# The probability-flow ODE likelihood
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [2, 16])
@pytest.mark.parametrize("name", SDES)
def test_exact_divergence_matches_the_exact_density(name, d):
    sde, mix = SDES[name](), mixture(d)
    error, nfe = ode_error_bits(sde, mix, points(mix, 16))
    print(f"{name} d={d}: max |error| {error.abs().max().item():.2e} bits/dim, nfe {nfe}")
    assert error.abs().max() < ODE_TOL_BITS
    assert 20 < nfe < 1000


@pytest.mark.parametrize("divergence", ["rademacher", "gaussian"])
@pytest.mark.parametrize("d", [2, 16])
@pytest.mark.parametrize("name", SDES)
def test_hutchinson_is_unbiased_within_three_standard_errors(name, d, divergence):
    """4 points × 16 probes each: the errors are independent, so their mean is within 3 standard errors of 0."""
    sde, mix = SDES[name](), mixture(d)
    x = points(mix, 4).repeat(16, 1)
    error, _ = ode_error_bits(sde, mix, x, divergence, torch.Generator().manual_seed(7))
    stderr = error.std() / math.sqrt(len(error))
    assert error.std() > 0  # really a random estimate
    assert error.mean().abs() < 3 * stderr + SOLVER_SLACK_BITS, (error.mean().item(), stderr.item())


def test_probe_is_fixed_for_the_whole_solve_and_seeded():
    sde, mix = VPSDE(), mixture(2)
    x = points(mix, 8)
    runs = [L.log_likelihood(mix.marginal_score_fn(sde), sde, x, generator=torch.Generator().manual_seed(s))[0]
            for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_scipy_backend_agrees_with_dopri5_on_the_device():
    sde, mix = VESDE(), mixture(2)
    x = points(mix, 8)
    torch_logp, torch_z, torch_nfe = L.log_likelihood(mix.marginal_score_fn(sde), sde, x, divergence="exact")
    scipy_logp, scipy_z, scipy_nfe = L.log_likelihood(mix.marginal_score_fn(sde), sde, x, divergence="exact",
                                                      backend="scipy")
    assert (torch_logp - scipy_logp).abs().max() / (2 * L.LN2) < 1e-3
    assert torch.allclose(torch_z, scipy_z, rtol=1e-3, atol=1e-3)
    assert abs(torch_nfe - scipy_nfe) <= 0.1 * scipy_nfe


@pytest.mark.parametrize("mutation", ["divergence sign flipped", "probability-flow ½ missing"])
def test_a_wrong_divergence_or_drift_fails_the_oracle(monkeypatch, mutation):
    """The checks above are not vacuous: each deliberate mistake moves the result by far more than the tolerance."""
    original_form, original_drift = L.probe_quadratic_form, L.probability_flow_drift
    if mutation == "divergence sign flipped":
        monkeypatch.setattr(L, "probe_quadratic_form", lambda v, x, probe: -original_form(v, x, probe))
    else:  # the reverse SDE's drift f − g²·s instead of the ODE's f − ½g²·s
        monkeypatch.setattr(L, "probability_flow_drift", lambda score_fn, sde, x, t: 2 * original_drift(
            score_fn, sde, x, t) - sde.sde(x, torch.full((x.shape[0],), t, dtype=x.dtype))[0])
    for name, d in (("vp", 2), ("ve", 16)):
        mix = mixture(d)
        error, _ = ode_error_bits(SDES[name](), mix, points(mix, 8))
        assert error.abs().max() > ODE_TOL_BITS, (mutation, name, d)


# --------------------------------------------------------------------------------------------------
# K-level data: dequantization and the offset
# --------------------------------------------------------------------------------------------------
# (K, centered, the offset log2(K/a) worked out by hand: a = 2 maps [0, 1] onto [−1, 1], a = 1 leaves it)
DISCRETE_CASES = [(256, True, 7.0), (256, False, 8.0), (17, True, math.log2(17 / 2))]
IMAGE_SHAPE = (1, 2, 2)


def image_dataset(num_levels: int, centered: bool, n: int = 8) -> ImageDataset:
    levels = torch.randint(0, num_levels, (n, *IMAGE_SHAPE), generator=torch.Generator().manual_seed(num_levels))
    return ImageDataset(levels.to(torch.uint8), levels.to(torch.uint8), num_levels, batch_size=n, seed=0,
                        centered=centered, random_flip=False, uniform_dequantization=False)


def image_model(centered: bool) -> GaussianMixture:
    """A 4-dimensional mixture spread over the model's data range ([−1, 1] or [0, 1])."""
    lo, width = (-1.0, 2.0) if centered else (0.0, 1.0)
    means = lo + width * torch.rand(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return GaussianMixture([0.2, 0.3, 0.5], means, [0.15 * width, 0.25 * width, 0.2 * width])


def image_score(mix: GaussianMixture, sde):
    flat = mix.marginal_score_fn(sde)
    return lambda x, t: flat(x.flatten(1), t).reshape(x.shape)


def bpd_error_bits(num_levels: int, centered: bool, offset: float, seed: int = 3) -> torch.Tensor:
    """bits_per_dim minus −log2 p_eps(x)/D − offset for the same dequantized x (prior mismatch removed as above)."""
    sde, mix, data = VPSDE(), image_model(centered), image_dataset(num_levels, centered)
    levels = data.test.long()
    bpd, z, _ = L.bits_per_dim(image_score(mix, sde), sde, levels, num_levels=num_levels, to_model=data.to_model,
                               divergence="exact", generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    u = torch.rand(levels.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)  # the same draw
    x = data.to_model((levels + u) / num_levels).flatten(1)
    mismatch = sde.prior_logp(z) - mix.log_prob(z.flatten(1), *coefficients(sde, sde.T))
    expected = -(mix.log_prob(x, *coefficients(sde, EPS)) + mismatch) / (x.shape[1] * L.LN2) + offset
    return bpd - expected


@pytest.mark.parametrize("num_levels, centered, offset", DISCRETE_CASES)
def test_bits_per_dim_is_the_dequantized_nll_plus_the_offset(num_levels, centered, offset):
    data = image_dataset(num_levels, centered)
    assert L.dequantization_offset_bits(num_levels, data.to_model) == pytest.approx(offset, abs=1e-12)
    assert bpd_error_bits(num_levels, centered, offset).abs().max() < BPD_TOL_BITS


@pytest.mark.parametrize("mutation", ["hard-coded 8", "K − 1 levels", "scaler ignored"])
def test_a_wrong_offset_fails(monkeypatch, mutation):
    wrong = {"hard-coded 8": lambda K, to_model: 8.0,
             "K − 1 levels": lambda K, to_model: math.log2((K - 1) / L.scaler_slope(to_model)),
             "scaler ignored": lambda K, to_model: math.log2(K)}[mutation]
    monkeypatch.setattr(L, "dequantization_offset_bits", wrong)
    worst = max(bpd_error_bits(K, centered, offset).abs().max().item() for K, centered, offset in DISCRETE_CASES)
    assert worst > BPD_TOL_BITS, mutation


def test_discrete_inputs_are_checked():
    with pytest.raises(ValueError, match="affine"):
        L.scaler_slope(lambda y: y**2)
    with pytest.raises(ValueError, match="0..16"):
        L.dequantize(torch.tensor([[17]]), 17)
    with pytest.raises(ValueError, match="integers"):
        L.dequantize(torch.tensor([[0.5]]), 17)
    with pytest.raises(ValueError, match="divergence"):
        L.log_likelihood(lambda x, t: x, VPSDE(), torch.zeros(2, 2), divergence="hutchinson")


def test_evaluate_bpd_reports_mean_standard_error_and_nfe():
    sde, mix, data = VPSDE(), image_model(True), image_dataset(17, True, n=12)
    config = default_config()
    e = config.eval
    e.batch_size, e.bpd_repeats, e.bpd_num_batches, e.bpd_divergence = 4, 2, 2, "exact"
    report = L.evaluate_bpd(image_score(mix, sde), sde, data, config, "cpu", torch.Generator().manual_seed(0))
    assert report["bpd_count"] == 2 * 2 * 4 and len(report["bpd_passes"]) == 2
    assert report["bpd"] == pytest.approx(sum(report["bpd_passes"]) / 2)
    assert report["bpd_passes"][0] != report["bpd_passes"][1]  # fresh dequantization noise per pass
    assert 0 < report["bpd_std"] < 1 and report["bpd_nfe"] > 20
    assert 0 < report["bpd"] < 8


def test_bpd_config_keys_are_validated():
    config = default_config()
    config.model.attn_resolutions = (4,)
    validate_config(config)
    for key, value in (("bpd_dataset", "valid"), ("bpd_divergence", "hutch"), ("bpd_repeats", 0),
                       ("bpd_eps", 1.5)):
        bad = default_config()
        bad.model.attn_resolutions = (4,)
        bad.eval[key] = value
        with pytest.raises(ConfigError, match=f"eval.{key}"):
            validate_config(bad)


# --------------------------------------------------------------------------------------------------
# The continuous-time ELBO (Song et al. 2021)
# --------------------------------------------------------------------------------------------------
def gaussian_prior_mismatch(sde, x):
    """E_{x_T|x}[log π(x_T) − log p_T(x_T)] for GAUSSIAN data, in closed form (x_T ~ N(a·x, s² I) from eps)."""
    a, s = (v.item() for v in L.kernel_from(sde, torch.tensor([sde.T], dtype=torch.float64), EPS))
    alpha_T, sigma_T = (v.item() for v in coefficients(sde, sde.T))
    mean_T, var_T = alpha_T * GAUSSIAN.means[0], alpha_T**2 * GAUSSIAN.stds[0].item() ** 2 + sigma_T**2
    d = x.shape[1]

    def expected_logpdf(mean, var):
        return -0.5 * d * math.log(2 * math.pi * var) - ((a * x - mean).pow(2).sum(1) + d * s**2) / (2 * var)

    return expected_logpdf(torch.zeros(2, dtype=torch.float64), sde.prior_std**2) - expected_logpdf(mean_T, var_T)


def elbo_draws(score_fn, sde, x, replicates, seed=1, importance_sampling=True):
    """(points, replicates) independent one-draw ELBO estimates for each point of x."""
    estimate = L.elbo(score_fn, sde, x.repeat_interleave(replicates, 0), num_times=1,
                      importance_sampling=importance_sampling, generator=torch.Generator().manual_seed(seed))
    return estimate.elbo.reshape(len(x), replicates)


def scaled_score(score_fn, scale):
    return lambda x, t: scale * score_fn(x, t)


@pytest.mark.parametrize("name", SDES)
def test_elbo_of_the_exact_score_is_the_exact_log_likelihood_up_to_the_prior_mismatch(name):
    """With s = ∇log p_t the model's path measure is the forward process's, so the ELBO's gap is only
    E[log π(x_T) − log p_T(x_T)] (closed form for Gaussian data): the estimate must match to 3 standard errors."""
    sde = SDES[name]()
    x = points(GAUSSIAN, 3, seed=4)
    draws = elbo_draws(GAUSSIAN.marginal_score_fn(sde), sde, x, replicates=4000)
    exact = GAUSSIAN.log_prob(x, *coefficients(sde, EPS)) + gaussian_prior_mismatch(sde, x)
    stderr = draws.std(1) / math.sqrt(draws.shape[1])
    assert ((draws.mean(1) - exact).abs() < 3 * stderr + 1e-3).all(), (draws.mean(1) - exact, stderr)


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_elbo_is_below_the_log_likelihood_and_tightens_as_the_score_improves(name):
    """Averaged over data from p_eps, ELBO ≤ log p_eps (Gibbs); a worse score (scaled by 1.2, 1.5) gives a
    strictly lower bound. Common random numbers make the differences precise."""
    sde, n = SDES[name](), 2000
    alpha, sigma = coefficients(sde, EPS)
    x = alpha * points(GAUSSIAN, n, seed=5) + sigma * torch.randn(n, 2, generator=torch.Generator().manual_seed(6))
    log_p = GAUSSIAN.log_prob(x, alpha, sigma)
    gaps = []
    for scale in (1.0, 1.2, 1.5):
        draws = elbo_draws(scaled_score(GAUSSIAN.marginal_score_fn(sde), scale), sde, x, replicates=2)
        gap = (log_p[:, None] - draws).flatten()
        gaps.append(gap)
        assert gap.mean() > -3 * gap.std() / math.sqrt(len(gap)), scale  # ELBO ≤ log-likelihood
    for tighter, looser in zip(gaps, gaps[1:]):
        difference = looser - tighter
        assert difference.mean() > 3 * difference.std() / math.sqrt(len(difference))


def test_elbo_bits_per_dim_matches_the_ode_bits_per_dim_for_the_exact_score():
    """Same images and dequantization noise: with the exact score the ELBO is log p_eps + the prior mismatch and
    the ODE gives log p_eps + log π(z) − log p_T(z); both mismatch terms are below 0.003 bits/dim here, so the two
    bits/dim agree to 3 standard errors of the ELBO's Monte Carlo (64 replicates × 4 draws per image)."""
    sde, mix, data = VPSDE(), image_model(True), image_dataset(17, True)
    levels, score_fn, offset = data.test.long(), image_score(mix, sde), math.log2(8.5)
    ode_bpd, _, _ = L.bits_per_dim(score_fn, sde, levels, num_levels=17, to_model=data.to_model, divergence="exact",
                                   generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    u = torch.rand(levels.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)  # the same draw
    x = data.to_model((levels + u) / 17).repeat(64, 1, 1, 1)
    estimate = L.elbo(score_fn, sde, x, num_times=4, generator=torch.Generator().manual_seed(10))
    elbo_bpd = (-estimate.elbo / (4 * L.LN2) + offset).reshape(64, -1)
    difference, stderr = elbo_bpd.mean(0) - ode_bpd, elbo_bpd.std(0) / 8
    assert (difference.abs() < 3 * stderr + 3e-3).all(), (difference, stderr)

    generator = torch.Generator().manual_seed(11)  # elbo_bits_per_dim = dequantize, then `elbo`, then the offset
    x = data.to_model(L.dequantize(levels, 17, generator, torch.float64))
    expected = -L.elbo(score_fn, sde, x, num_times=2, generator=generator).elbo / (4 * L.LN2) + offset
    bpd = L.elbo_bits_per_dim(score_fn, sde, levels, num_levels=17, to_model=data.to_model, num_times=2,
                              generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    assert torch.equal(bpd, expected)


def test_importance_sampling_lowers_the_elbo_variance():
    sde = VPSDE()
    x = points(GAUSSIAN, 2, seed=4)
    score_fn = GAUSSIAN.marginal_score_fn(sde)
    spread = [elbo_draws(score_fn, sde, x, 2000, importance_sampling=flag).std(1) for flag in (True, False)]
    assert (spread[0] < 0.7 * spread[1]).all(), spread


# --------------------------------------------------------------------------------------------------
# The DDPM variational bound
# --------------------------------------------------------------------------------------------------
def test_vlb_is_above_the_exact_nll_and_tightens_with_more_steps():
    """Continuous Gaussian data, exact score: E[VLB] ≥ E[−log p] (the model's marginal is not p for finite
    steps, and cross-entropy ≥ entropy) with the gap shrinking as the chain refines (4 → 16 → 64 steps)."""
    sde, n = VPSDE(), 16000
    x = points(GAUSSIAN, n, seed=8)
    nll = -GAUSSIAN.log_prob(x)
    gaps = []
    for steps in (4, 16, 64):
        terms = L.ddpm_vlb(GAUSSIAN.marginal_score_fn(sde), sde, x, steps=steps,
                           generator=torch.Generator().manual_seed(steps))
        gap = terms.total - nll
        stderr = gap.std() / math.sqrt(n)
        assert gap.mean() > -3 * stderr, steps
        gaps.append((gap.mean().item(), stderr.item()))
    for (tight, tight_se), (loose, loose_se) in zip(gaps[1:], gaps):
        assert loose - tight > 3 * math.hypot(tight_se, loose_se), gaps


class FactorizedLevels:
    """K-level data whose D coordinates are independent with P(k) = the mass of N(μ, s²) on level k's decoder bin:
    exact −log P(levels), and the exact score of the data diffused on a chain (a 1-D mixture per coordinate)."""

    def __init__(self, num_levels, to_model, mu=0.1, s=0.3, dims=2):
        self.decoder = L.DiscretizedGaussianDecoder(num_levels, to_model)
        self.centers = self.decoder.centers(torch.arange(num_levels), torch.float64)
        mean = torch.full((num_levels,), mu, dtype=torch.float64)
        self.log_mass = -self.decoder.nll(self.centers[:, None], mean[:, None], s**2)  # (K,) log P(k)
        self.num_levels, self.dims = num_levels, dims

    def all_levels(self):
        grids = torch.meshgrid(*[torch.arange(self.num_levels)] * self.dims, indexing="ij")
        return torch.stack([g.flatten() for g in grids], 1)  # (K^D, D)

    def nll(self, levels):
        return -self.log_mass[levels].sum(1)

    def score_fn(self, sde):
        def score(x, t):
            alpha, sigma = chain_for(sde).alpha_sigma(t)
            alpha, sigma = alpha.double()[:, None, None], sigma.double()[:, None, None]
            diff = alpha * self.centers - x[..., None]  # (batch, D, K)
            post = torch.softmax(self.log_mass - 0.5 * diff**2 / sigma**2, -1)
            return (post * diff).sum(-1) / sigma[..., 0] ** 2
        return score


def test_discrete_vlb_on_the_ddpm_chain_bounds_the_exact_discrete_nll():
    """K = 17, D = 2, every one of the 289 level pairs weighted by its probability: E[VLB] ≥ H(P) in bits/dim,
    tightening from 10 to 100 to 1000 steps of the DDPM chain (exact score of the chain's marginals).

    DDPM's variance β ("large") is not the true reverse variance at the chain's first steps (for point masses that
    is β̃, and β̃/β ≈ ½ there), so even the full 1000-step chain keeps a gap of a few tenths of a bit per dim."""
    sde = VPSDE()
    data = image_dataset(17, True)
    oracle = FactorizedLevels(17, data.to_model)
    levels = oracle.all_levels().repeat(4, 1)
    weights = oracle.log_mass[levels].sum(1).exp()
    weights = weights / weights.sum()
    entropy_bits = (weights * oracle.nll(levels)).sum() / (2 * L.LN2)
    gaps = []
    for steps in (10, 100, 1000):
        bpd = L.ddpm_vlb_bpd(oracle.score_fn(sde), sde, levels, num_levels=17, to_model=data.to_model, steps=steps,
                             generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
        gap = bpd - entropy_bits
        mean = (weights * gap).sum()
        stderr = torch.sqrt((weights**2 * (gap - mean) ** 2).sum())
        assert mean > -3 * stderr, steps
        gaps.append((mean.item(), stderr.item()))
    for (tight, tight_se), (loose, loose_se) in zip(gaps[1:], gaps):
        assert loose - tight > 3 * math.hypot(tight_se, loose_se), gaps
    assert gaps[-1][0] < 0.5, gaps


def test_discretized_decoder_masses_sum_to_one():
    data = image_dataset(17, False)
    decoder = L.DiscretizedGaussianDecoder(17, data.to_model)
    centers = decoder.centers(torch.arange(17), torch.float64)[:, None]
    for mean, var in ((0.37, 0.01), (-3.0, 1e-4), (0.5, 25.0)):
        mass = torch.exp(-decoder.nll(centers, torch.full_like(centers, mean), var))
        assert mass.sum().item() == pytest.approx(1.0, abs=1e-12)


# --------------------------------------------------------------------------------------------------
# Training with likelihood weighting and importance sampling
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SDES)
def test_importance_sampled_loss_has_the_likelihood_weighted_expectation(name):
    """At the exact score of N(μ, s²I) data the per-dimension DSM value is α²s²/(α²s² + σ²), so both estimators
    must average ∫ g²/σ² · α²s²/(α²s² + σ²) dt / (T − eps); importance sampling does it with less spread
    (except for VE, where g²/σ² is constant and the two samplers coincide)."""
    sde, eps, s = SDES[name](), 1e-3, 0.5
    mean_data = GAUSSIAN.means[0]

    def weighted_irreducible(t):
        alpha, sigma = coefficients(sde, t)
        g2 = L.diffusion_squared(sde, torch.tensor([t], dtype=torch.float64)).item()
        return g2 / sigma.item() ** 2 * (alpha**2 * s**2 / (alpha**2 * s**2 + sigma**2)).item()

    expected = scipy.integrate.quad(weighted_irreducible, eps, 1.0, limit=400)[0] / (1 - eps)
    x0 = mean_data + s * torch.randn(100_000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact_score = GAUSSIAN.marginal_score_fn(sde)
    per_example = []
    for loss in (paper_losses.importance_sampled_dsm_loss, lambda *a, **k: paper_losses.dsm_loss(*a, likelihood_weighting=True,
                                                                                     **k)):
        chunks = torch.stack([loss(exact_score, sde, chunk, eps=eps, generator=torch.Generator().manual_seed(i))
                              for i, chunk in enumerate(x0.split(1000))])
        assert abs(chunks.mean().item() - expected) < 4 * chunks.std().item() / math.sqrt(len(chunks)) + 1e-3 * expected
        per_example.append(chunks.std())
    print(name, "spread of chunk means, importance sampled vs uniform:", [v.item() for v in per_example])
    if name == "ve":  # g²/σ² is constant for VE: importance sampling is uniform sampling
        assert per_example[0] == pytest.approx(per_example[1].item())
    else:
        assert per_example[0] < 0.5 * per_example[1]
    loss_fn = losses.get_loss_fn(sde, likelihood_weighting=True, importance_sampling=True, eps=eps)
    assert torch.isfinite(loss_fn(exact_score, x0[:8]))
    with pytest.raises(ValueError, match="likelihood"):
        losses.get_loss_fn(sde, importance_sampling=True)
