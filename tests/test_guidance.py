"""Guidance against exact answers on class-conditional Gaussian mixtures (sde_diffusion.toy.LabelledMixture).

With exact scores, classifier-free guidance at w = 0 and classifier guidance with the exact ∇ log p_t(y | x) at
scale 1 both give ∇ log p_t(x | y), so samplers driven by them must draw p(x | y): checked with pc and DPM-Solver++
on VP and VE, per class, by the sliced W₂ (in units of its noise floor), the within-class mode weights, means and
stds, and the mass landing on the other class's modes. Mutations of the guidance formulas fail these checks. w > 0
sharpens (mass on the other class's side shrinks), and CFG with w equals classifier guidance with scale 1 + w.
"""
import math

import pytest
import torch

from sde_diffusion import guidance
from sde_diffusion.config import default_config
from sde_diffusion.metrics_toy import mixture_failures, sliced_w2_noise_floor
from sde_diffusion.models import create_model, get_score_fn
from sde_diffusion.sampling import sample
from sde_diffusion.sdes import VESDE, VPSDE
from sde_diffusion.toy import GaussianMixture, LabelledMixture, default_mixture

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

SDES = {"vp": VPSDE, "ve": VESDE}
SAMPLERS = {"pc": ("pc", 100, {}), "dpm_solver": ("dpm_solver", 20, dict(order=3))}  # NFE 101 and 21
# The `gmm` toy mixture (4 modes on a square, weights 0.1..0.4) with classes left = {0, 1} and right = {2, 3}:
# within-class weights 1/3, 2/3 and 3/7, 4/7.
SQUARE = LabelledMixture(default_mixture(), [[0, 1], [2, 3]])
CHUNK, CHUNKS = 500, 4  # per class: CHUNKS chunks of CHUNK points, each compared with its own exact sample
SEED = 1

# Per class, metrics_toy.mixture_failures' tolerances: sliced W₂ ≤ 1.5 × noise floor (measured 0.79–1.28 for
# correct guidance, ≥ 2.8 wrong), within-class mode weights, means and stds (std error measured ≤ 0.07).
MAX_OTHER_CLASS = 0.005  # fraction of a class's samples nearest the other class's modes; measured 0 (wrong: ≥ 0.09)


@pytest.fixture(scope="module")
def floors():
    return [sliced_w2_noise_floor(SQUARE.class_mixture(y), CHUNK) for y in range(2)]


def class_labels(n_per_class: int, classes: int = 2) -> torch.Tensor:
    return torch.arange(classes).repeat_interleave(n_per_class)


def class_failures(x: torch.Tensor, labels: torch.Tensor, floors) -> list:
    """What a sampler of p(x | y) gets wrong, per class (empty: every check passed)."""
    if not torch.isfinite(x).all():
        return ["non-finite samples"]
    failures = []
    for y in range(2):
        xy = x[labels == y]
        failures += [f"class {y}: {f}" for f in mixture_failures(SQUARE.class_mixture(y), xy, CHUNK, floors[y])]
        other = (SQUARE.log_class_posterior(xy).argmax(1) != y).double().mean().item()
        if not other <= MAX_OTHER_CLASS:
            failures.append(f"class {y}: {other:.3f} of the samples on the other class's modes")
    return failures


def exact_scores(mixture: LabelledMixture, sde, labels):
    """(conditional, unconditional, ∇ log p_t(y | x)) exact functions for per-sample labels."""
    return (mixture.conditional_score_fn(sde, labels), mixture.mixture.marginal_score_fn(sde),
            mixture.class_posterior_grad_fn(sde, labels))


def draw(score_fn, sde, n, sampler):
    method, steps, options = SAMPLERS[sampler]
    x, _ = sample(score_fn, sde, (n, 2), method, steps=steps, generator=torch.Generator().manual_seed(SEED),
                  **options)
    return x


def guided(kind: str, cond, uncond, grad):
    if kind == "classifier_free_w0":
        return guidance.classifier_free(cond, uncond, 0.0)
    return guidance.classifier(uncond, grad, 1.0)


@pytest.mark.parametrize("kind", ["classifier_free_w0", "classifier_scale1"])
@pytest.mark.parametrize("sde_name, sampler", [("vp", "pc"), ("vp", "dpm_solver"), ("ve", "dpm_solver")])
def test_exact_guidance_samples_the_class_conditional_mixture(sde_name, sampler, kind, floors):
    sde, labels = SDES[sde_name](), class_labels(CHUNK * CHUNKS)
    x = draw(guided(kind, *exact_scores(SQUARE, sde, labels)), sde, len(labels), sampler)
    failures = class_failures(x, labels, floors)
    assert not failures, f"{kind}, {sampler} on {sde_name}: {failures}"


MUTATIONS = {  # wrong guidance formulas, each of which a correct-looking implementation could contain
    "w_instead_of_1_plus_w": lambda cond, uncond, grad: lambda x, t: 0.0 * cond(x, t) - 0.0 * uncond(x, t),
    "conditional_and_unconditional_swapped": lambda cond, uncond, grad: guidance.classifier_free(uncond, cond, 0.0),
    "classifier_gradient_sign": lambda cond, uncond, grad: guidance.classifier(uncond, grad, -1.0),
    "classifier_scale_half": lambda cond, uncond, grad: guidance.classifier(uncond, grad, 0.5),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_wrong_guidance_fails_the_same_checks(mutation, floors):
    sde, labels = VPSDE(), class_labels(CHUNK * CHUNKS)
    x = draw(MUTATIONS[mutation](*exact_scores(SQUARE, sde, labels)), sde, len(labels), "dpm_solver")
    assert class_failures(x, labels, floors), f"{mutation} passed the checks"


@pytest.mark.parametrize("sde_name", SDES)
def test_classifier_free_with_w_is_classifier_guidance_with_scale_one_plus_w(sde_name):
    """(1 + w)·s(x,t,y) − w·s(x,t) = s(x,t) + (1 + w)·∇log p_t(y|x) pointwise, with the class posterior's gradient
    by autograd and the conditional score in closed form (two independent computations)."""
    sde = SDES[sde_name]()
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (256,), generator=gen)
    t = torch.rand(256, generator=gen, dtype=torch.float64) * 0.99 + 0.01
    mean, std = sde.marginal_prob(torch.zeros(256, 2, dtype=torch.float64), t)
    x = (torch.randn(256, 2, generator=gen, dtype=torch.float64) * 3 + mean) * (1 + std[:, None])
    cond, uncond, grad = exact_scores(SQUARE, sde, labels)
    for w in (0.0, 0.5, 3.0):
        torch.testing.assert_close(guidance.classifier_free(cond, uncond, w)(x, t),
                                   guidance.classifier(uncond, grad, 1 + w)(x, t), rtol=1e-9, atol=1e-9)


# Two overlapping unit-variance classes at (∓1, 0): class 0's samples with x₁ > 0 lie on class 1's side;
# exactly Φ(−1) = 0.1587 of them at w = 0. Guidance pushes them away; the x₂ direction, which does not tell the
# classes apart, keeps its unit std.
OVERLAP = LabelledMixture(GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.0]], 1.0), [[0], [1]])
OTHER_SIDE_AT_W0 = 0.5 * math.erfc(1 / math.sqrt(2))
# w → most the fraction on the other side may be; measured with pc (VP, 3000 samples): 0.169, 0.022, 0.0003
MAX_OTHER_SIDE = {1.0: 0.05, 3.0: 0.005}


def test_guidance_scale_sharpens_toward_the_class():
    sde, n = VPSDE(), 3000
    labels = torch.zeros(n, dtype=torch.long)
    cond, uncond, grad = exact_scores(OVERLAP, sde, labels)
    other_side, means = {}, {}
    for w in (0.0, *MAX_OTHER_SIDE):
        x = draw(guidance.classifier_free(cond, uncond, w), sde, n, "pc")
        other_side[w], means[w] = (x[:, 0] > 0).double().mean().item(), x[:, 0].mean().item()
        assert abs(x[:, 1].std().item() - 1) <= 0.05, f"w={w}: std along x₂ {x[:, 1].std().item():.3f}"
    se = math.sqrt(OTHER_SIDE_AT_W0 * (1 - OTHER_SIDE_AT_W0) / n)
    assert abs(other_side[0.0] - OTHER_SIDE_AT_W0) <= 4 * se, other_side
    assert abs(means[0.0] + 1) <= 4 / math.sqrt(n) + 0.02, means
    for w, bound in MAX_OTHER_SIDE.items():
        assert other_side[w] <= bound, other_side
    assert means[0.0] > means[1.0] > means[3.0], means


# --------------------------------------------------------------------------------------------------
# Label dropout and guidance of a network
# --------------------------------------------------------------------------------------------------
def test_label_dropout_replaces_the_given_fraction_by_the_null_label():
    labels = torch.arange(200_000) % 4
    dropped = guidance.drop_labels(labels, 0.2, null_label=4, generator=torch.Generator().manual_seed(0))
    is_null = dropped == 4
    rate = is_null.double().mean().item()
    assert abs(rate - 0.2) <= 4 * math.sqrt(0.2 * 0.8 / len(labels)), rate
    assert torch.equal(dropped[~is_null], labels[~is_null])
    assert torch.equal(guidance.drop_labels(labels, 0.0, null_label=4), labels)


def conditional_mlp(num_classes: int = 4):
    config = default_config()
    config.data.dataset, config.model.name, config.model.nf, config.model.num_res_blocks = "gmm", "mlp", 32, 1
    config.model.num_classes = num_classes
    model = create_model(config).eval()
    with torch.no_grad():  # a random network whose every part matters (the output layers start at zero)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    return model


def test_guided_score_fn_of_a_network_is_classifier_free_guidance_in_one_pass():
    model, sde = conditional_mlp(), VPSDE()
    x, t = torch.randn(6, 2), torch.rand(6) * 0.9 + 0.05
    labels = torch.tensor([0, 1, 2, 3, 0, 2])
    cond, uncond = get_score_fn(sde, model, labels=labels), get_score_fn(sde, model)
    with torch.no_grad():
        assert not torch.allclose(cond(x, t), uncond(x, t), atol=1e-3)
        for w in (0.0, 2.0):
            torch.testing.assert_close(guidance.guided_score_fn(sde, model, labels, guidance_scale=w)(x, t),
                                       guidance.classifier_free(cond, uncond, w)(x, t))
        shift = lambda x, t: torch.ones_like(x)  # noqa: E731 - a stand-in for ∇ log p(y | x)
        torch.testing.assert_close(
            guidance.guided_score_fn(sde, model, labels, guidance_scale=2.0, grad_log_p_y=shift,
                                     classifier_scale=0.5)(x, t),
            guidance.classifier_free(cond, uncond, 2.0)(x, t) + 0.5)
    with pytest.raises(ValueError, match="class- or text-conditional"):
        guidance.guided_score_fn(sde, model, None, guidance_scale=1.0)
