"""Parameterizations (network output ↔ score, noise conditioning) and the EDM formulation built on them."""
import math

import numpy as np
import pytest
import torch

import paper_losses  # tests/: the losses as the papers write them

from sde_diffusion import parameterization as P
from sde_diffusion.config import ConfigError, load_config_file, validate_config
from sde_diffusion.metrics_toy import mixture_failures, sliced_w2_noise_floor
from sde_diffusion.models import get_score_fn
from sde_diffusion.sampling import sample
from sde_diffusion.sdes import EDMSDE, SubVPSDE, VESDE, VPSDE
from sde_diffusion.toy import default_mixture

SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE, "edm": EDMSDE}


def times(sde):
    return torch.tensor([0.9, 0.5, 0.1, 1e-3], dtype=torch.float64) * sde.T


class Recorder(torch.nn.Module):
    """A 'network' that returns a fixed output and remembers what it was given."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, x, cond):
        self.x, self.cond = x, cond
        return self.output


@pytest.mark.parametrize("name", sorted(P.PARAMETERIZATIONS))
@pytest.mark.parametrize("sde_name", SDES)
@pytest.mark.parametrize("continuous", [True, False])
def test_every_parameterization_round_trips(name, sde_name, continuous):
    sde = SDES[sde_name](N=100)
    if not continuous and sde_name in ("subvp", "edm"):
        with pytest.raises(ValueError, match="has none"):
            P.resolve(sde, continuous, name)
        return
    if name == "consistency" and not continuous:
        with pytest.raises(ValueError, match="continuous-time network"):
            P.resolve(sde, continuous, name)
        return
    if name == "score_table" and sde_name != "ve":
        with pytest.raises(ValueError, match="VE SDE"):
            P.resolve(sde, continuous, name)
        return
    p = P.resolve(sde, continuous, name)
    t = times(sde)
    if name == "consistency":  # its output is free at the boundary (tests/test_consistency.py): move it below t
        p = P.ConsistencyParameterization(sde, continuous=continuous, eps=0.5 * t[-1].item())
    g = torch.Generator().manual_seed(0)
    x, out = (torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(2))
    # exact up to float64 round-off amplified by 1/σ² (x0 at σ(1e-3) ≈ 1e-4 for sub-VP)
    torch.testing.assert_close(p.output(p.score(out, x, t), x, t), out, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(p.score(p.output(out, x, t), x, t), out, rtol=1e-7, atol=1e-9)
    # and through get_score_fn: the score of the network that outputs p.output(s) is s
    score = torch.randn(4, 3, generator=g, dtype=torch.float64)
    net = Recorder(p.output(score, x, t))
    torch.testing.assert_close(get_score_fn(sde, net, continuous, parameterization=p)(x, t), score)


@pytest.mark.parametrize("sde_name", SDES)
def test_v_and_velocity_targets_are_the_papers_definitions(sde_name):
    """On random x_0, ε and t, the output whose score is the exact conditional score −ε/σ of x = α·x_0 + σ·ε is
    v = α·ε − σ·x_0 for 'v' and u = dx_t/dt = α′·x_0 + σ′·ε for 'velocity' (α′, σ′ by float64 autograd through
    the SDE's α(t), σ(t), not its drift/diffusion formulas); so a network trained to them predicts these targets."""
    sde = SDES[sde_name]()
    g = torch.Generator().manual_seed(3)
    x0, eps = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([0.9, 0.5, 0.1, 0.01, 0.002], dtype=torch.float64) * sde.T
    alpha, sigma = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
    x, score = alpha * x0 + sigma * eps, -eps / sigma
    d_alpha, d_sigma = (torch.autograd.functional.jacobian(f, t).diagonal()[:, None] for f in (sde.alpha, sde.sigma))
    v, velocity = P.resolve(sde, True, "v"), P.resolve(sde, True, "velocity")
    torch.testing.assert_close(v.output(score, x, t), alpha * eps - sigma * x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(velocity.output(score, x, t), d_alpha * x0 + d_sigma * eps, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(v.score(alpha * eps - sigma * x0, x, t), score, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(velocity.score(d_alpha * x0 + d_sigma * eps, x, t), score, rtol=1e-7, atol=1e-9)
    if sde_name in ("vp", "ve"):  # on the discrete chain: its α_i, σ_i, and the SDE's α′, σ′ at the level's time
        t = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64) * sde.T
        chain_v, chain_u = P.resolve(sde, False, "v"), P.resolve(sde, False, "velocity")
        alpha, sigma = (c[:, None] for c in chain_v.alpha_sigma(t))
        x, score = alpha * x0[:3] + sigma * eps[:3], -eps[:3] / sigma
        torch.testing.assert_close(chain_v.output(score, x, t), alpha * eps[:3] - sigma * x0[:3])
        torch.testing.assert_close(chain_u.output(score, x, t), d_alpha[:3] * x0[:3] + d_sigma[:3] * eps[:3])


def test_auto_reproduces_score_sdes_conventions():
    """The formulas of score_sde (and of this package before parameterizations existed), written out."""
    t = torch.tensor([0.9, 0.5, 0.1, 1e-3], dtype=torch.float64)
    x, out = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    vp, sub, ve = VPSDE(N=1000), SubVPSDE(), VESDE()

    def run(sde, continuous=True):
        net = Recorder(out)
        return get_score_fn(sde, net, continuous)(x, t), net.cond, net.x

    score, cond, seen = run(vp)  # ε-prediction, conditioned on 999·t
    torch.testing.assert_close(cond, 999 * t)
    torch.testing.assert_close(score, -out / vp.sigma(t)[:, None])
    assert seen is x
    score, cond, _ = run(sub)
    torch.testing.assert_close(cond, 999 * t)
    torch.testing.assert_close(score, -out / sub.sigma(t)[:, None])
    score, cond, _ = run(ve)  # σ-scaled score, conditioned on σ(t)
    torch.testing.assert_close(cond, 0.01 * (50 / 0.01) ** t)
    torch.testing.assert_close(score, out / ve.sigma(t)[:, None])
    # discrete VP: labels (N−1)·t, σ_i of DDPM's chain at the truncated step: 999·0.5 → step 499
    score, cond, _ = run(vp, continuous=False)
    torch.testing.assert_close(cond, 999 * t)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    steps = [899, 499, 99, 0]
    torch.testing.assert_close(score, -out / torch.tensor(np.sqrt(1 - abar[steps]))[:, None])
    # discrete VE: SMLD labels counted from σ_max, σ_i of the geometric table
    score, cond, _ = run(ve, continuous=False)
    torch.testing.assert_close(cond, 999.0 - torch.tensor(steps, dtype=torch.float64))
    sigmas = np.exp(np.linspace(np.log(0.01), np.log(50.0), 1000))
    torch.testing.assert_close(score, out / torch.tensor(sigmas[steps])[:, None], rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="SubVPSDE has none"):
        get_score_fn(sub, Recorder(out), continuous=False)
    assert P.noise_condition(vp, t).equal(999 * t) and P.noise_condition(ve, t).equal(ve.sigma(t))
    assert isinstance(P.resolve(EDMSDE()), P.EDMPreconditioning)


def test_edm_coefficients_are_the_papers():
    """Karras et al. (2022), Table 1, at σ = 1 and σ_data = 0.5, and in general."""
    c_skip, c_out, c_in, c_noise = P.edm_coefficients(torch.tensor(1.0, dtype=torch.float64), 0.5)
    assert c_skip.item() == pytest.approx(0.25 / 1.25) and c_out.item() == pytest.approx(0.5 / math.sqrt(1.25))
    assert c_in.item() == pytest.approx(1 / math.sqrt(1.25)) and c_noise.item() == 0.0
    sigma = torch.tensor([0.002, 0.1, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = P.edm_coefficients(sigma, 0.5)
    torch.testing.assert_close(c_skip * (sigma**2 + 0.25), torch.full_like(sigma, 0.25))
    torch.testing.assert_close(c_out**2 * (sigma**2 + 0.25), 0.25 * sigma**2)
    torch.testing.assert_close(c_in**2 * (sigma**2 + 0.25), torch.ones_like(sigma))
    torch.testing.assert_close(c_noise, torch.log(sigma) / 4)
    # λ(σ)·c_out² = 1: the EDM loss weights the raw network output F uniformly
    torch.testing.assert_close(paper_losses.edm_weight(sigma, 0.5) * c_out**2, torch.ones_like(sigma))


@pytest.mark.parametrize("sde_name", ["edm", "vp"])
def test_edm_preconditioning_works_in_the_scaled_variable(sde_name):
    """D(x̃; σ̃) = c_skip x̃ + c_out F(c_in x̃; ¼ ln σ̃) with x̃ = x/α, σ̃ = σ/α; score = (D − x̃)/(α σ̃²)."""
    sde = SDES[sde_name]()
    t = times(sde)
    alpha, sigma = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
    s = sigma / alpha
    x, F = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    net = Recorder(F)
    p = P.resolve(sde, name="edm")
    score = get_score_fn(sde, net, parameterization=p)(x, t)
    c_skip, c_out, c_in, c_noise = P.edm_coefficients(s, 0.5)
    torch.testing.assert_close(net.x, c_in * x / alpha)
    torch.testing.assert_close(net.cond, c_noise[:, 0])
    D = c_skip * x / alpha + c_out * F
    torch.testing.assert_close(p.denoiser(F, x, t), D)
    torch.testing.assert_close(score, (D - x / alpha) / (alpha * s**2))


def test_edm_loss_is_minimal_at_the_exact_denoiser():
    """The EDM loss of the oracle's exact score is below that of the exact score moved along any direction h:
    with common random numbers the loss is a parabola in the step c whose vertex lies at c ≈ 0."""
    mix, sde = default_mixture(), EDMSDE()
    x0 = mix.sample(20000, torch.Generator().manual_seed(0))[0].double()
    exact = mix.marginal_score_fn(sde)

    def loss(c, h):
        score_fn = lambda x, t: exact(x, t) + c * h(x, t)  # noqa: E731
        return paper_losses.edm_loss(score_fn, sde, x0, generator=torch.Generator().manual_seed(1)).item()

    directions = {"shrink": lambda x, t: -x / (1 + t[:, None] ** 2),
                  "shift": lambda x, t: torch.ones_like(x) / (1 + t[:, None] ** 2)}
    for name, h in directions.items():
        delta = 0.2
        left, mid, right = loss(-delta, h), loss(0.0, h), loss(delta, h)
        assert mid < left and mid < right, name
        vertex = 0.5 * delta * (left - right) / (left - 2 * mid + right)
        assert abs(vertex) < 0.05 * delta, (name, vertex)


def test_edm_loss_is_dsm_weighted_by_edm_lambda():
    """Per example, λ(σ̃)·‖D − x0‖² = (σ̃² + σ_d²)/σ_d²·‖σ·s + z‖²: checked with a score that ignores x."""
    sde, x0 = VPSDE(), torch.randn(64, 3, dtype=torch.float64)
    fixed = torch.randn(64, 3, dtype=torch.float64)
    value = paper_losses.edm_loss(lambda x, t: fixed, sde, x0, reduce_mean=False,
                            generator=torch.Generator().manual_seed(4)).item()
    g = torch.Generator().manual_seed(4)
    log_sigma = torch.randn(64, generator=g, dtype=torch.float64) * paper_losses.EDM_P_STD + paper_losses.EDM_P_MEAN
    t = sde.t_from_log_snr(-log_sigma).clamp(1e-5, 1.0)
    z = torch.randn(64, 3, generator=g, dtype=torch.float64)
    sigma, s_tilde = sde.sigma(t)[:, None], (sde.sigma(t) / sde.alpha(t))[:, None]
    expected = ((s_tilde**2 + 0.25) / 0.25 * (sigma * fixed + z) ** 2).sum(1).mean().item()
    assert value == pytest.approx(expected, rel=1e-10)


def test_edm_sde_with_the_exact_score_samples_with_heun():
    mix, sde, chunk = default_mixture(), EDMSDE(), 500
    x, nfe = sample(mix.marginal_score_fn(sde), sde, (4 * chunk, 2), "heun", steps=25,
                    generator=torch.Generator().manual_seed(1))
    assert nfe == 2 * 25 - 1 + 1
    failures = mixture_failures(mix, x, chunk, sliced_w2_noise_floor(mix, chunk))
    assert not failures, failures


def config_with(**keys):
    """configs/vp_digits.py with section__key=value overrides."""
    config = load_config_file("configs/vp_digits.py")
    for key, value in keys.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


def test_config_keys_are_validated_by_their_owners():
    validate_config(load_config_file("configs/edm_digits.py"))
    edm = P.from_config(load_config_file("configs/edm_digits.py"), EDMSDE())
    assert isinstance(edm, P.EDMPreconditioning) and edm.conditioning == "log_sigma"
    bad = [(dict(model__parameterization="vee"), "model.parameterization"),
           (dict(model__noise_conditioning="t"), "model.noise_conditioning"),
           (dict(model__sigma_data=0.0), "model.sigma_data"),
           (dict(model__scale_by_sigma=True), "scale_by_sigma"),  # VP's auto parameterization is ε
           (dict(training__sde="vesde", model__scale_by_sigma=True, model__parameterization="x0"), "scale_by_sigma"),
           (dict(training__sde="subvpsde", training__continuous=False), "no discrete chain"),
           (dict(training__sde="edm", model__noise_conditioning="step"), "noise_conditioning='step'"),
           (dict(training__loss="l2"), "training.loss"),
           (dict(training__loss="edm", training__continuous=False), "training.loss='edm'"),
           (dict(training__sde="edm", model__sigma_min=100.0), "sigma_min"),
           (dict(training__sde="bm"), "training.sde")]
    for keys, message in bad:
        with pytest.raises(ConfigError, match=message):
            validate_config(config_with(**keys))
    validate_config(config_with(training__sde="vesde", model__scale_by_sigma=True))
    validate_config(config_with(model__parameterization="x0", model__noise_conditioning="log_sigma"))
    validate_config(config_with(model__parameterization="v"))
    validate_config(config_with(model__parameterization="velocity"))


def test_score_table_divides_by_the_level_at_the_integer_part_of_sigma():
    """score_sde_pytorch's VE positional networks: σ(t) = 0.0109, 0.0549, 1.657, 32.66 index levels 0, 0, 1, 32 of
    exp(linspace(ln 50, ln 0.01, 1000)), i.e. divisors 50, 50, 49.6, 38.1 (fixture README, grid_08)."""
    sde = VESDE(0.01, 50.0, 1000)
    t = torch.tensor([0.01, 0.2, 0.6, 0.95], dtype=torch.float64)
    p = P.resolve(sde, True, "score_table")
    levels = 50.0 * (0.01 / 50.0) ** (torch.tensor([0, 0, 1, 32], dtype=torch.float64) / 999)
    torch.testing.assert_close(p.divisor(t), levels, rtol=1e-12, atol=0)
    torch.testing.assert_close(p.divisor(t)[:2], torch.full((2,), 50.0, dtype=torch.float64))
    out = torch.ones(4, 2, dtype=torch.float64)
    torch.testing.assert_close(p.score(out, out, t), 1.0 / levels[:, None].expand(4, 2))
    # discrete labels: the level itself, as 'score' with the chain's σ_i
    q, r = P.resolve(sde, False, "score_table"), P.resolve(sde, False, "score")
    torch.testing.assert_close(q.score(out, out, t), r.score(out, out, t), rtol=1e-6, atol=0)


def test_get_score_fn_defaults_to_the_parameterization_the_network_was_built_with():
    from sde_diffusion.models import create_model

    config = load_config_file("configs/toy_gmm.py")
    config.model.parameterization = "x0"
    model = create_model(config)
    sde = VPSDE(N=100)
    x, t = torch.randn(5, 2, generator=torch.Generator().manual_seed(0)), torch.full((5,), 0.3)
    with torch.no_grad():
        default = get_score_fn(sde, model)(x, t)
        explicit = get_score_fn(sde, model, parameterization=P.from_config(config, sde))(x, t)
        eps = get_score_fn(sde, model, parameterization="eps")(x, t)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    assert (default - eps).abs().max() > 1e-3  # x0 and ε read the same output differently
