"""--mode compare's parts: entries (several step counts, malformed ones), the common time grid, the standard errors
behind the 95 % intervals (FID jackknife, KID closed form, sliced W₂ / NLL) and the plot's series. Fast: small
synthetic features instead of Inception; the end-to-end run is tests/test_evaluation.py::
test_compare_mode_on_toy_data_writes_table_and_plot."""
import re
from itertools import permutations

import numpy as np
import pytest
import torch

from configs import toy_gmm
from evaluation.compare import Z95, check_config, metric_cells, parse_entries, parse_entry, plot_series
from evaluation.metrics import (feature_statistics, frechet_distance, jackknife_fids, jackknife_groups,
                                jackknife_standard_error, kernel_inception_distance, kid_and_standard_error)
from sde_diffusion import sampling
from sde_diffusion.config import ConfigError, validate_config
from sde_diffusion.jobs.compare import entry_settings
from sde_diffusion.sampling.grids import DEFAULT_GRID, FEW_STEP_GRID, FEW_STEPS


# --- entries ------------------------------------------------------------------------------------------------
def test_a_multi_count_entry_is_one_row_per_count_in_increasing_order():
    rows = parse_entry("ddim:eta=0.5@20, 5,10")
    assert [row.steps for row in rows] == [5, 10, 20]
    assert {(row.method, row.label, row.entry) for row in rows} == {("ddim", "ddim:eta=0.5", "ddim:eta=0.5@20, 5,10")}
    assert rows[0].options == {"eta": 0.5} and rows[0].slug == "ddim_eta-0.5@5"
    single = parse_entry("dpm_solver:order=3,denoise=false@20")
    assert [(r.method, r.steps, r.options) for r in single] == [("dpm_solver", 20, {"order": 3, "denoise": False})]


@pytest.mark.parametrize("entry, message", [
    ("ddim@5,,10", "step count '' is not a whole number"), ("ddim@0", "step count '0'"), ("ddim@a", "step count 'a'"),
    ("ddim@5,", "step count ''"), ("ddim@5,5", "lists step count 5 twice"), ("ddim", "no '@steps'"),
    ("ddim@²", "step count '²'"), ("pc:snr@10", "key=value"), ("magic@10", "unknown sampling method"),
    ("ddim:grid=hexagonal@10", "grid='hexagonal'"),
])
def test_a_malformed_entry_is_a_config_error_naming_it(entry, message):
    with pytest.raises(ConfigError, match=re.escape(f"compare.samplers entry {entry!r}") + ".*" + re.escape(message)):
        parse_entry(entry)
    config = toy_gmm.get_config()
    config.compare.samplers = ("pc@10", entry)
    with pytest.raises(ConfigError, match=re.escape(repr(entry))):
        validate_config(config)  # the compare section is checked with the rest of the config, before any work


def test_the_compare_section_is_checked():
    with pytest.raises(ConfigError, match=r"pc@8 comes twice \(entries 'pc@4,8' and 'pc@8'\)"):
        parse_entries(("pc@4,8", "pc@8"))
    assert [row.steps for row in parse_entries(("pc@4,8", "pc:snr=0.1@8"))] == [4, 8, 8]  # other options: other row
    config = toy_gmm.get_config()
    check_config(config)
    for bad in ((), ("ddim@10", "ddim@10")):
        config.compare.samplers = bad
        with pytest.raises(ConfigError, match="compare.samplers"):
            check_config(config)
    config = toy_gmm.get_config()
    for bad in (1, -2):
        config.compare.resamples = bad
        with pytest.raises(ConfigError, match="compare.resamples"):
            check_config(config)


# --- the common time grid -----------------------------------------------------------------------------------
ENTRIES = ("pc@4", f"ddim@4,{FEW_STEPS + 1}", "heun@3", "ode@3", "dpm_solver:grid=edm@5")


def grids(config, entries=ENTRIES):
    return [entry_settings(config, row)["grid"] for row in parse_entries(entries)]


def test_every_row_runs_on_the_common_grid_unless_its_entry_names_one():
    config = toy_gmm.get_config()
    # the common default: the few-step spacing up to FEW_STEPS steps (every sampler, pc's time grid not excepted)
    few = FEW_STEP_GRID
    assert grids(config) == [few, few, DEFAULT_GRID, few, few, "edm"]
    settings = entry_settings(config, parse_entry("heun@3")[0])
    assert settings == dict(method="heun", steps=3, eps=None, denoise=True, grid=few)
    config.sampling.grid, config.sampling.rho = "edm", 5.0
    assert grids(config) == ["edm"] * 6
    assert entry_settings(config, parse_entry("heun@3")[0])["rho"] == 5.0  # sampling.rho goes with sampling.grid
    assert entry_settings(config, parse_entry("heun:rho=3@3")[0])["rho"] == 3.0  # the entry's own wins
    config.sampling.grid = "quadratic"
    assert grids(config) == ["quadratic"] * 5 + ["edm"]


def test_a_grid_file_sets_the_times_and_must_have_the_entrys_steps(tmp_path):
    config = toy_gmm.get_config()
    path = sampling.save_grid(tmp_path / "grid.json", torch.tensor([1.0, 0.5, 0.1, 1e-3], dtype=torch.float64))
    settings = entry_settings(config, parse_entry(f"ddim:grid={path}@3")[0])
    assert settings["grid"] == str(path) and settings["eps"] is None and settings["steps"] == 3
    with pytest.raises(ConfigError, match=re.escape(f"'ddim:grid={path}@4'") + ".*has 3 steps, not 4"):
        entry_settings(config, parse_entry(f"ddim:grid={path}@4")[0])
    config.sampling.grid = str(path)
    with pytest.raises(ConfigError, match=r"'ddim@5'.*\(sampling.grid\) has 3 steps, not 5"):
        entry_settings(config, parse_entry("ddim@5")[0])
    config.sampling.grid = str(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match=r"'ddim@5'.*does not exist"):
        entry_settings(config, parse_entry("ddim@5")[0])


# --- FID: delete-a-group jackknife ------------------------------------------------------------------------
def gaussian_features(rng, n, d, scale=1.0, shift=0.0):
    mixing = np.linspace(0.5, 1.5, d)
    return rng.standard_normal((n, d)) * mixing * scale + shift


@pytest.mark.parametrize("n, d", [(30, 40), (60, 6)])  # through the Gram matrix (n ≤ d) and the covariance
def test_each_jackknife_fid_is_the_fid_of_the_kept_features(n, d):
    rng = np.random.default_rng(0)
    features, reference = gaussian_features(rng, n, d, 1.2, 0.3), gaussian_features(rng, 500, d)
    mu, sigma = feature_statistics(reference)
    groups = jackknife_groups(n, 7, seed=3)
    assert sorted(np.concatenate(groups)) == list(range(n)) and {len(g) for g in groups} <= {n // 7, n // 7 + 1}
    expected = [frechet_distance(*feature_statistics(np.delete(features, g, axis=0)), mu, sigma) for g in groups]
    # 1e-6: with n < d frechet_distance's Σ₁^½Σ₂Σ₁^½ has d − n + 1 zero eigenvalues, each rounded to ±1e-16·scale,
    # whose square roots it adds (≈ 1e-8 each); the jackknife's Gram matrix has none
    assert jackknife_fids(features, mu, sigma, groups) == pytest.approx(expected, rel=1e-6 if n < d else 1e-9)


def test_jackknife_standard_error_is_the_textbook_formula():
    # g = 3 values with mean 7/3: (g − 1)/g · Σ (θ_j − θ̄)² = 2/3 · (16 + 1 + 25)/9
    assert jackknife_standard_error(np.array([1.0, 2.0, 4.0])) == pytest.approx(np.sqrt(2 / 3 * 42 / 9))


def fid_and_error(features, reference, groups=20, seed=0):
    mu, sigma = feature_statistics(reference)
    fids = jackknife_fids(features, mu, sigma, jackknife_groups(len(features), groups, seed))
    return frechet_distance(*feature_statistics(features), mu, sigma), jackknife_standard_error(fids)


def test_the_fid_interval_holds_the_estimate_shrinks_with_more_samples_and_matches_the_spread():
    rng = np.random.default_rng(1)
    reference = gaussian_features(rng, 4000, 8)
    fid, se = fid_and_error(gaussian_features(rng, 100, 8, 1.1, 0.1), reference)
    cells = metric_cells({"fid": fid, "fid_se": se}, "fid")
    assert cells["fid_lo"] < fid < cells["fid_hi"] and cells["fid_hi"] - fid == pytest.approx(Z95 * se)
    more = fid_and_error(gaussian_features(rng, 1600, 8, 1.1, 0.1), reference)[1]
    assert more < se / 2  # ~1/√n: a quarter
    # calibration: the jackknife's standard error against the actual spread of FID over independent sample sets
    draws = [fid_and_error(gaussian_features(rng, 200, 8, 1.1, 0.1), reference, seed=r) for r in range(100)]
    spread, typical = np.std([f for f, _ in draws], ddof=1), np.sqrt(np.mean([e ** 2 for _, e in draws]))
    assert 0.75 < typical / spread < 1.35, (typical, spread)


def test_the_fid_jackknife_is_seeded():
    rng = np.random.default_rng(2)
    features, reference = gaussian_features(rng, 50, 5), gaussian_features(rng, 300, 5)
    assert fid_and_error(features, reference, seed=4) == fid_and_error(features, reference, seed=4)
    assert fid_and_error(features, reference, seed=4)[1] != fid_and_error(features, reference, seed=5)[1]


def test_image_scores_add_standard_errors_when_asked():
    from evaluation.sample_quality import ImageMetrics
    rng = np.random.default_rng(3)
    reference = gaussian_features(rng, 300, 6)
    metrics = ImageMetrics.__new__(ImageMetrics)  # the reference statistics without Inception
    metrics.seed, metrics.reference = 0, dict(zip(("mu", "sigma"), feature_statistics(reference)), features=reference)
    features = gaussian_features(rng, 80, 6, 1.2)
    plain, with_errors = metrics.scores(features, None), metrics.scores(features, None, resamples=10)
    assert "fid_se" not in plain and "kid_se" not in plain
    assert {k: with_errors[k] for k in plain} == plain  # the estimates are unchanged
    mu, sigma = metrics.reference["mu"], metrics.reference["sigma"]
    fids = jackknife_fids(features, mu, sigma, jackknife_groups(80, 10, seed=0))
    assert with_errors["fid_se"] == pytest.approx(jackknife_standard_error(fids), rel=1e-9)
    assert with_errors["kid_se"] == kid_and_standard_error(features, reference, seed=0)[1] > 0


# --- KID: closed-form standard error ----------------------------------------------------------------------
def kid_error_by_definition(generated, reference, seed, num_subsets, max_subset_size):
    """The standard error written out from its definition, with explicit sums over index tuples."""
    n, d = generated.shape
    m = min(n, len(reference), max_subset_size)
    draws = np.random.RandomState(seed)
    subsets = [(draws.choice(len(reference), m, replace=False), draws.choice(n, m, replace=False))
               for _ in range(num_subsets)]
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    a = {}  # a(y_j): mean kernel with the reference points of the subsets that drew y_j
    for ix, iy in subsets:
        for j in iy:
            a.setdefault(j, []).append(np.mean([k(reference[i], generated[j]) for i in ix]))
    a = {j: np.mean(v) for j, v in a.items()}
    u, zeta1, zeta2 = [], [], []
    for ix, iy in subsets:
        x, y = reference[ix], generated[iy]
        pairs = list(permutations(range(m), 2))
        u.append(np.mean([k(x[i], x[j]) + k(y[i], y[j]) for i, j in pairs])
                 - 2 * np.mean([k(x[i], y[j]) for i in range(m) for j in range(m)]))
        g = lambda i, j: k(y[i], y[j]) - a[iy[i]] - a[iy[j]]  # noqa: E731,B023
        disjoint = np.mean([g(i, j) * g(p, q) for i, j, p, q in permutations(range(m), 4)])
        zeta1.append(np.mean([g(i, j) * g(i, q) for i, j, q in permutations(range(m), 3)]) - disjoint)
        zeta2.append(np.mean([g(i, j) ** 2 for i, j in pairs]) - disjoint)
    variance = (4 * (n - 2) * max(np.mean(zeta1), 0) + 2 * np.mean(zeta2)) / (n * (n - 1))
    return np.mean(u), np.sqrt(variance + np.var(u, ddof=1) / num_subsets)


@pytest.mark.parametrize("n, n_ref, max_subset_size", [(7, 9, 6), (6, 6, 10)])
def test_kid_standard_error_matches_its_definition_on_a_small_example(n, n_ref, max_subset_size):
    rng = np.random.default_rng(5)
    generated, reference = rng.standard_normal((n, 3)) + 0.4, rng.standard_normal((n_ref, 3))
    expected = kid_error_by_definition(generated, reference, 11, 3, max_subset_size)
    assert kid_and_standard_error(generated, reference, 11, 3, max_subset_size) == pytest.approx(expected, rel=1e-9)


def test_kid_is_clean_fids_and_its_standard_error_matches_the_spread():
    from cleanfid.fid import kernel_distance
    rng = np.random.default_rng(6)
    generated, reference = rng.standard_normal((300, 8)), rng.standard_normal((500, 8)) + 0.1
    np.random.seed(5)
    clean = kernel_distance(generated, reference, num_subsets=7, max_subset_size=100)
    assert kernel_inception_distance(generated, reference, seed=5, num_subsets=7, max_subset_size=100) == \
        pytest.approx(clean, rel=1e-12)
    reference = rng.standard_normal((400, 16))
    draws = [kid_and_standard_error(rng.standard_normal((100, 16)) * 1.05 + 0.2, reference, seed=r, num_subsets=20,
                                    max_subset_size=50) for r in range(100)]
    spread, typical = np.std([v for v, _ in draws], ddof=1), np.sqrt(np.mean([e ** 2 for _, e in draws]))
    assert 0.8 < typical / spread < 1.25, (typical, spread)
    assert np.isnan(kid_and_standard_error(reference[:3], reference, num_subsets=2)[1])  # too few for the variance


# --- toy data ---------------------------------------------------------------------------------------------
def test_toy_scores_standard_errors():
    from evaluation.sample_quality import toy_scores
    from sde_diffusion.data.datasets import get_dataset
    config = toy_gmm.get_config()
    dataset = get_dataset(config)
    samples = dataset.test[torch.randperm(len(dataset.test), generator=torch.Generator().manual_seed(0))] * 1.1
    assert "sliced_w2_se" not in toy_scores(samples[:256], dataset)  # no resamples: no standard errors
    small, large = toy_scores(samples[:256], dataset, 20, seed=1), toy_scores(samples, dataset, 20, seed=1)
    assert small == toy_scores(samples[:256], dataset, 20, seed=1)  # seeded
    nll = -dataset.log_prob(samples[:256].double())
    assert small["nll_se"] == pytest.approx(float(nll.std()) / 16, rel=1e-9)
    assert 0 < large["sliced_w2_se"] < small["sliced_w2_se"] / 2 and large["nll_se"] < small["nll_se"] / 2


# --- intervals and the plot's series ------------------------------------------------------------------------
def test_metric_cells_give_no_interval_without_a_finite_standard_error():
    assert metric_cells({"kid": 0.5}, "kid") == {"kid": 0.5, "kid_lo": None, "kid_hi": None}
    assert metric_cells({"kid": 0.5, "kid_se": float("nan")}, "kid")["kid_lo"] is None
    assert metric_cells({}, "fid") == {"fid": None, "fid_lo": None, "fid_hi": None}


def test_plot_series_draws_multi_count_entries_as_curves_and_single_counts_as_points():
    def row(entry, nfe, value, se=0.1):
        return {"entry": entry, "nfe": nfe, **metric_cells({"fid": value, "fid_se": se}, "fid")}
    rows = [row("ddim@10,5", 6, 3.0), row("ddim@10,5", 11, 2.0), row("pc@8", 9, 5.0),
            {"entry": "heun@4", "nfe": 8, "fid": 4.0, "fid_lo": None, "fid_hi": None}, row("pc@16", 17, None)]
    series = plot_series(rows, "fid")
    assert [(s.label, s.curve, s.nfe, s.values) for s in series] == [
        ("ddim@10,5", True, (6, 11), (3.0, 2.0)), ("pc@8", False, (9,), (5.0,)), ("heun@4", False, (8,), (4.0,))]
    assert series[0].lo == pytest.approx((3.0 - Z95 * 0.1, 2.0 - Z95 * 0.1)) and series[2].lo is None
