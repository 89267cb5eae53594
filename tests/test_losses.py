"""Losses against closed forms for Gaussian data N(μ, s²I), where every marginal's score is known exactly.

At the exact score, E‖σ(t)·s(x_t, t) + z‖² per dimension is the irreducible value α²s²/(α²s² + σ²).
"""
import math

import pytest
import scipy.integrate
import torch

import paper_losses  # tests/: the losses as the papers write them

from sde_diffusion import losses
from sde_diffusion.discrete import chain_for
from sde_diffusion.training.ema import ExponentialMovingAverage
from sde_diffusion.training import optim
from sde_diffusion.sdes import SubVPSDE, VESDE, VPSDE

MU, S, D = 0.5, 0.8, 4
SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}


def gaussian_score(sde, scale=1.0, shift=0.0):
    def score_fn(x, t):
        a, sig = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
        return scale * (-(x - a * MU) / (a**2 * S**2 + sig**2)) + shift
    return score_fn


def irreducible(sde, t):
    a, sig = sde.alpha(torch.tensor(t, dtype=torch.float64)), sde.sigma(torch.tensor(t, dtype=torch.float64))
    return (a**2 * S**2 / (a**2 * S**2 + sig**2)).item()


def data(n, seed=0):
    return MU + S * torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", SDES)
def test_dsm_loss_at_exact_score_is_the_irreducible_value(name):
    sde, eps = SDES[name](), 1e-3
    expected = scipy.integrate.quad(lambda t: irreducible(sde, t), eps, 1.0, limit=200)[0] / (1 - eps)
    g = torch.Generator().manual_seed(1)
    x0 = data(200_000)
    mean_loss = paper_losses.dsm_loss(gaussian_score(sde), sde, x0, eps=eps, reduce_mean=True, generator=g).item()
    assert abs(mean_loss - expected) < 0.02 * expected, (mean_loss, expected)
    sum_loss = paper_losses.dsm_loss(gaussian_score(sde), sde, x0, eps=eps, reduce_mean=False, generator=g).item()
    assert abs(sum_loss - D * expected) < 0.02 * D * expected
    # any other score does worse on the same draws
    for wrong in (gaussian_score(sde, scale=1.1), gaussian_score(sde, scale=0.9), gaussian_score(sde, shift=0.05)):
        worse = paper_losses.dsm_loss(wrong, sde, x0, eps=eps, generator=torch.Generator().manual_seed(1)).item()
        assert worse > mean_loss + 1e-4


@pytest.mark.parametrize("name", SDES)
def test_likelihood_weighting_multiplies_by_g2_over_sigma2(name):
    sde, eps = SDES[name](), 1e-2

    def weighted(t):
        g2 = sde.sde(torch.zeros(1, 1, dtype=torch.float64), torch.tensor([t], dtype=torch.float64))[1].item() ** 2
        return g2 / sde.sigma(torch.tensor(t, dtype=torch.float64)).item() ** 2 * irreducible(sde, t)

    expected = D * scipy.integrate.quad(weighted, eps, 1.0, limit=200)[0] / (1 - eps)
    loss = paper_losses.dsm_loss(gaussian_score(sde), sde, data(400_000), eps=eps, reduce_mean=False,
                           likelihood_weighting=True, generator=torch.Generator().manual_seed(2)).item()
    assert abs(loss - expected) < 0.03 * expected, (loss, expected)


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_discrete_losses_at_the_chain_score(name):
    """DDPM's L_simple (VP) and the SMLD loss (VE) at the exact score of the discrete chain's marginals."""
    sde = SDES[name](N=50)
    t_grid = torch.arange(sde.N, dtype=torch.float64) / (sde.N - 1)
    alpha, sigma = chain_for(sde).alpha_sigma(t_grid)
    expected = (alpha**2 * S**2 / (alpha**2 * S**2 + sigma**2)).mean().item()

    def chain_score(x, t):
        a, sig = (v[:, None] for v in chain_for(sde).alpha_sigma(t))
        return -(x - a * MU) / (a**2 * S**2 + sig**2)

    loss = paper_losses.discrete_dsm_loss(chain_score, sde, data(200_000), generator=torch.Generator().manual_seed(3))
    assert abs(loss.item() - expected) < 0.02 * expected
    loss_fn = losses.get_loss_fn(sde, continuous=False, reduce_mean=True)
    assert abs(loss_fn(chain_score, data(200_000), generator=torch.Generator().manual_seed(3)).item() - loss.item()) < 1e-12


def test_ddpm_loss_is_epsilon_matching():
    """With ε̂ = −σ_i·score, the discrete loss equals ‖ε̂ − ε‖² for an ε-predicting score function."""
    sde = VPSDE(N=1000)
    x0 = data(64)
    eps_hat = torch.randn(64, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def score_fn(x, t):  # a "network" that always predicts eps_hat
        return -eps_hat / chain_for(sde).alpha_sigma(t)[1][:, None]

    g = torch.Generator().manual_seed(6)
    loss = paper_losses.discrete_dsm_loss(score_fn, sde, x0, reduce_mean=False, generator=g)
    g = torch.Generator().manual_seed(6)
    torch.randint(0, sde.N, (64,), generator=g)  # the same step draws, then the same noise
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(loss, ((eps_hat - eps) ** 2).sum(1).mean())


def test_impossible_loss_combinations_are_rejected():
    with pytest.raises(ValueError, match="continuous=True"):
        losses.get_loss_fn(SubVPSDE(), continuous=False)
    with pytest.raises(ValueError, match="likelihood weighting"):
        losses.get_loss_fn(VPSDE(), continuous=False, likelihood_weighting=True)


def test_warmup_learning_rate_and_fused_adam():
    class O:
        lr, warmup, grad_clip, optimizer, beta1, beta2, eps, weight_decay = 1e-2, 10, 1.0, "Adam", 0.9, 0.99, 1e-8, 0.0
        schedule = "constant"

    assert optim.learning_rate(5, O) == pytest.approx(5e-3)
    assert optim.learning_rate(50, O) == pytest.approx(1e-2)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = optim.make_optimizer([p], O)
    assert opt.defaults["fused"] and opt.defaults["lr"] == O.lr and opt.defaults["betas"] == (0.9, 0.99)
    O.optimizer = "Adamax"
    with pytest.raises(ValueError, match="optim.optimizer='Adamax' is not one of"):
        optim.make_optimizer([p], O)




def test_ema_update_store_restore():
    p = torch.nn.Parameter(torch.zeros(2))
    ema = ExponentialMovingAverage([p], decay=0.9, use_num_updates=False)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update([p])
    torch.testing.assert_close(ema.shadow_params[0], torch.full((2,), 0.1))
    ema.update([p])
    torch.testing.assert_close(ema.shadow_params[0], torch.full((2,), 0.19))
    model = torch.nn.Linear(1, 1)
    ema = ExponentialMovingAverage(model.parameters(), decay=0.5)
    before = [q.detach().clone() for q in model.parameters()]
    with torch.no_grad():
        for q in model.parameters():
            q.add_(1.0)
    ema.update(model.parameters())  # num_updates=1 → decay min(0.5, 2/11)
    with ema.average_parameters(model):
        for q, b in zip(model.parameters(), before):
            torch.testing.assert_close(q, b + 9 / 11)
    for q, b in zip(model.parameters(), before):
        torch.testing.assert_close(q, b + 1.0)
    assert math.isclose(ema.state_dict()["num_updates"], 1)
