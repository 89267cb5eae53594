"""Post-hoc EMA (sde_diffusion/phema.py): the power-function profiles against their definition, tracking that leaves
training untouched, reconstruction of an EMA length another run tracked directly, and the errors."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import run_lib
from configs.toy_gmm import get_config
from sde_diffusion import phema
from sde_diffusion.checkpoints import load_checkpoint
from sde_diffusion.config import validate_config
from sde_diffusion.errors import CheckpointError, ConfigError
from sde_diffusion.models import create_model

ROOT = Path(__file__).resolve().parents[1]
STEPS, FREQ = 400, 10


def test_sigma_rel_and_gamma_are_inverse_and_the_range_is_the_power_functions():
    for sigma_rel in (0.01, 0.05, 0.1, 0.2, 0.29):
        gamma = phema.gamma_of_sigma_rel(sigma_rel)
        assert gamma > phema.GAMMA_AT_MAX and phema.sigma_rel_of_gamma(gamma) == pytest.approx(sigma_rel, rel=1e-10)
    assert phema.gamma_of_sigma_rel(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2's two profiles
    assert phema.gamma_of_sigma_rel(0.10) == pytest.approx(6.94, abs=0.01)
    assert phema.SIGMA_REL_MAX == pytest.approx(0.3003, abs=1e-4)
    for bad in (0.0, -0.1, 0.31):
        with pytest.raises(ValueError, match="outside"):
            phema.gamma_of_sigma_rel(bad)


def test_tracked_profile_is_the_power_function_average_of_the_trajectory():
    """θ̂(t) = Σ_τ w_τ θ(τ) with w_τ = (τ^(γ+1) − (τ−1)^(γ+1)) / t^(γ+1): the density (γ+1)τ^γ/t^(γ+1) integrated
    over each step; its spread over τ is σ_rel·t."""
    model = nn.Linear(1, 1, bias=False)
    tracker = phema.PowerEMA(model, [0.05, 0.2])
    t = 2000
    trajectory = torch.randn(t, dtype=torch.float64)
    for step in range(1, t + 1):
        with torch.no_grad():
            model.weight.fill_(trajectory[step - 1].item())
        tracker.update(model.parameters(), step)
    tau = torch.arange(1, t + 1, dtype=torch.float64)
    for profile, gamma, sigma_rel in zip(tracker.profiles, tracker.gammas, tracker.sigma_rels):
        w = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / t ** (gamma + 1)
        assert profile[0].item() == pytest.approx((w * trajectory).sum().item(), abs=1e-5)
        mean = (w * (tau - 0.5)).sum()
        assert ((w * (tau - 0.5 - mean) ** 2).sum().sqrt() / t).item() == pytest.approx(sigma_rel, rel=2e-3)


def test_least_squares_returns_a_stored_profile_itself_and_fits_others():
    steps = list(range(FREQ, STEPS + 1, FREQ))
    gammas = [phema.gamma_of_sigma_rel(s) for s in (0.05, 0.10)]
    g, t = [x for _ in steps for x in gammas], [s for s in steps for _ in gammas]
    x, error = phema.solve_coefficients(g, t, gammas[1], STEPS)
    assert error < 1e-6 and np.allclose(x, np.eye(len(g))[-1], atol=1e-6)
    _, error = phema.solve_coefficients(g, t, phema.gamma_of_sigma_rel(0.07), STEPS)
    assert error < 0.01
    _, error = phema.solve_coefficients(g, t, phema.gamma_of_sigma_rel(0.01), STEPS)
    assert error > phema.MAX_PROFILE_ERROR  # far narrower than anything stored: refused


# --------------------------------------------------------------------------------------------------
def small_config(profiles=(), **training):
    config = get_config()
    t = config.training
    t.batch_size, t.n_iters, t.log_freq, t.eval_freq = 64, STEPS, 100, 100000
    t.snapshot_freq, t.snapshot_freq_for_preemption, t.snapshot_sampling = STEPS, STEPS, False
    t.post_hoc_ema, t.post_hoc_ema_freq = tuple(profiles), FREQ
    for key, value in training.items():
        t[key] = value
    config.model.nf, config.model.num_res_blocks = 32, 1
    config.optim.lr, config.optim.warmup = 5e-3, 20
    config.device = "cpu"
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs with one seed: no tracking, (0.05, 0.10) and (0.07,)."""
    torch.set_num_threads(1)
    out = {}
    for name, profiles in (("plain", ()), ("pair", (0.05, 0.10)), ("direct", (0.07,))):
        workdir = tmp_path_factory.mktemp(name)
        run_lib.train(small_config(profiles), workdir)
        out[name] = workdir
    return out


def final(workdir: Path):
    return load_checkpoint(workdir / "checkpoints" / "checkpoint_1.pth")


def stored(workdir: Path, step: int, index: int):
    """Profile `index` of the snapshot at `step` as a state dict."""
    snap = load_checkpoint(phema.snapshot_path(workdir, step))
    pieces = snap["profiles"][index].split([math.prod(s) for s in snap["shapes"]])
    return {n: p.reshape(s) for n, p, s in zip(snap["names"], pieces, snap["shapes"])}


def distance(a, b, names) -> float:
    return math.sqrt(sum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in names))


def test_tracking_leaves_the_raw_weights_bit_identical(runs):
    plain, pair, direct = (final(runs[k])["model"] for k in ("plain", "pair", "direct"))
    assert all(torch.equal(plain[k], pair[k]) and torch.equal(plain[k], direct[k]) for k in plain)
    assert not (runs["plain"] / "post_hoc_ema").exists()
    assert len(phema.snapshot_steps(runs["pair"])) == STEPS // FREQ


def test_reconstruction_matches_a_profile_another_run_tracked(runs):
    """σ_rel 0.07 rebuilt from the (0.05, 0.10) snapshots lands within 5 % of the directly tracked 0.07 profile's
    distance from the raw weights."""
    raw = final(runs["direct"])["model"]
    tracked = stored(runs["direct"], STEPS, 0)
    rebuilt = phema.reconstruct(runs["pair"], 0.07)
    names = list(tracked)
    model = create_model(small_config())
    model.load_state_dict(rebuilt, strict=True)  # a whole state dict: the buffers come with it
    assert sorted(rebuilt) == sorted(model.state_dict())
    gap, scale = distance(rebuilt, tracked, names), distance(tracked, raw, names)
    assert gap <= 0.05 * scale, (gap, scale)
    # and not by accident: the stored neighbours themselves are much farther from it
    for index in (0, 1):
        neighbour = stored(runs["pair"], STEPS, index)
        assert distance(neighbour, tracked, names) > 4 * gap


def test_a_tracked_profile_is_reconstructed_as_itself(runs):
    step = STEPS // 2
    profile = stored(runs["pair"], step, 1)
    rebuilt = phema.reconstruct(runs["pair"], 0.10, step=step)
    assert distance(rebuilt, profile, list(profile)) <= 1e-5 * math.sqrt(sum(float(v.pow(2).sum())
                                                                             for v in profile.values()))


def test_unrepresentable_sigma_rel_and_corrupt_snapshots(runs, tmp_path, caplog):
    with pytest.raises(CheckpointError, match="cannot represent σ_rel = 0.01"):
        phema.reconstruct(runs["pair"], 0.01)
    with pytest.raises(CheckpointError, match="no post-hoc EMA snapshots.*training.post_hoc_ema"):
        phema.reconstruct(runs["plain"], 0.07)
    # a damaged snapshot is named and left out while the rest still pins the profile down ...
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(runs["pair"] / "post_hoc_ema", copy / "post_hoc_ema")
    victim = phema.snapshot_path(copy, STEPS // 2)
    victim.write_bytes(victim.read_bytes()[:-100])
    rec = phema.reconstruction(copy, 0.07)
    assert rec.skipped == [victim.name] and victim.name in caplog.text
    # ... and named in the error when the rest cannot: a narrow profile's mass sits in its last few steps
    last = phema.snapshot_path(copy, STEPS)
    last.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=f"corrupt.*{last.name}"):
        phema.reconstruct(copy, 0.07, step=STEPS)


def test_half_precision_snapshots_halve_the_storage(tmp_path):
    model = nn.Linear(64, 64)
    tracker = phema.PowerEMA(model, [0.05, 0.1])
    tracker.update(model.parameters(), 1)
    full = phema.save_snapshot(tmp_path / "a", tracker, 1, "fp32").stat().st_size
    half = phema.save_snapshot(tmp_path / "b", tracker, 1, "bf16").stat().st_size
    params = sum(p.numel() for p in model.parameters())
    # two profiles × params × (4 or 2) bytes, plus a few kB of file structure
    assert full - half == pytest.approx(2 * params * 2, rel=0.02) and half < 2 * params * 2 + 4096
    assert load_checkpoint(phema.snapshot_path(tmp_path / "b", 1))["profiles"][0].dtype == torch.bfloat16


@pytest.mark.parametrize("key,value,message", [
    ("training.post_hoc_ema", (0.05, 0.4), "not a σ_rel in"),
    ("training.post_hoc_ema", (0.05, 0.05), "twice"),
    ("training.post_hoc_ema_freq", 300, "leaves 1 snapshot"),
    ("training.post_hoc_ema_precision", "fp8", "not one of"),
    ("eval.ema_sigma_rel", 0.5, "eval.ema_sigma_rel"),
    ("eval.ema_sweep", (0.1, 0.0), "eval.ema_sweep"),
])
def test_bad_keys_are_config_errors(key, value, message):
    config = small_config((0.05, 0.10))
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_resuming_with_profiles_a_run_started_without_them_is_refused(runs, tmp_path):
    import shutil
    workdir = tmp_path / "w"
    shutil.copytree(runs["plain"], workdir)
    config = small_config((0.05, 0.10))
    config.training.n_iters = STEPS + 10
    with pytest.raises(CheckpointError, match="without post-hoc EMA profiles"):
        run_lib.train(config, workdir)


def test_eval_and_sweep_use_the_reconstruction(runs):
    """--mode eval with eval.ema_sigma_rel reports the reconstruction; --mode ema_sweep writes the table and plot;
    a workdir without snapshots is one error line naming the keys."""
    config = small_config((0.05, 0.10))
    e = config.eval
    e.num_samples, e.batch_size, e.enable_loss, e.ema_sigma_rel = 256, 256, False, 0.07
    e.ema_sweep = (0.05, 0.07, 0.15)
    config.sampling.method, config.sampling.steps = "dpm_solver", 10
    config.compare.resamples = 0
    run_lib.evaluate(config, runs["pair"])
    report = json.loads((runs["pair"] / "eval" / "report_1_sigma_rel0.07.json").read_text())
    assert report["post_hoc_ema"]["sigma_rel"] == 0.07 and report["post_hoc_ema"]["step"] == STEPS
    assert len(report["post_hoc_ema"]["snapshots"]) == STEPS // FREQ and report["post_hoc_ema"]["profile_error"] < 0.05
    run_lib.sample(config, runs["pair"])  # sample and compare record the reconstruction too
    npz = next((runs["pair"] / "samples").glob("*_sigma_rel0.07.npz"))
    assert json.loads(str(np.load(npz)["post_hoc_ema"]))["sigma_rel"] == 0.07
    config.compare.samplers = ("ddim@10",)
    run_lib.compare(config, runs["pair"])
    compared = json.loads((runs["pair"] / "compare" / "compare.json").read_text())
    assert compared["post_hoc_ema"]["sigma_rel"] == 0.07
    assert (runs["pair"] / "compare" / "rounds_ddim@10_sigma_rel0.07").is_dir()  # not the regular EMA's rounds
    run_lib.ema_sweep(config, runs["pair"])
    table = json.loads((runs["pair"] / "ema_sweep" / "ema_sweep.json").read_text())
    assert [row["sigma_rel"] for row in table["rows"]] == [0.0, 0.05, 0.07, 0.15]
    assert all(row["sliced_w2"] > 0 for row in table["rows"])
    assert len({row["sliced_w2"] for row in table["rows"]}) == 4  # each σ_rel sampled its own weights
    assert (runs["pair"] / "ema_sweep" / "ema_sweep.png").stat().st_size > 0
    cmd = [sys.executable, "main.py", "--config", "configs/toy_gmm.py", "--mode", "eval", "--workdir",
           str(runs["plain"]), "--config.eval.ema_sigma_rel=0.07", "--config.device=cpu",
           "--config.model.nf=1"]  # the error comes before the network is built
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "training.post_hoc_ema" in lines[0] and "eval.ema_sigma_rel" in lines[0], \
        result.stderr[-2000:]


def test_edm2_digits_trains_sweeps_and_evaluates_through_main(tmp_path):
    """README's three commands on configs/edm2_digits.py, shortened: 6 steps, one profile snapshotted every 2 steps
    and at every numbered checkpoint (every 3 steps), 16 samples of 4 steps, no FID or bits/dim."""
    from sde_diffusion.config import load_config_file
    config = load_config_file(ROOT / "configs" / "edm2_digits.py")
    t, e = config.training, config.eval
    t.n_iters, t.snapshot_freq, t.snapshot_freq_for_preemption, t.log_freq = 6, 3, 3, 1
    t.post_hoc_ema, t.post_hoc_ema_freq = (0.1,), 2
    t.batch_size, e.num_samples, e.batch_size, e.enable_fid, e.enable_bpd = 16, 16, 16, False, False
    e.ema_sweep, config.sampling.steps, config.device = (0.1,), 4, "cpu"
    run_lib.train(config, tmp_path)
    assert [s for s, _ in phema.snapshot_steps(tmp_path)] == [2, 3, 4, 6]  # 3: numbered checkpoint 1
    run_lib.ema_sweep(config, tmp_path)  # on the newest checkpoint, step 6
    rows = json.loads((tmp_path / "ema_sweep" / "ema_sweep.json").read_text())["rows"]
    assert [r["sigma_rel"] for r in rows] == [0.0, 0.1] and all(r["nfe"] > 0 for r in rows)
    e.ema_sigma_rel = 0.1
    run_lib.evaluate(config, tmp_path)  # checkpoint 1, step 3
    report = json.loads((tmp_path / "eval" / "report_1_sigma_rel0.1.json").read_text())
    assert report["step"] == 3 and report["post_hoc_ema"]["snapshots"] == ["phema_2.pth", "phema_3.pth"]
    assert report["post_hoc_ema"]["profile_error"] < 1e-6  # the tracked profile itself
    # a resumed run drops the snapshots written after its checkpoint by the run it replaces
    for step in (4, 6):
        (tmp_path / "checkpoints-meta" / f"checkpoint_{step}.pth").unlink(missing_ok=True)
    t.n_iters = 3
    run_lib.train(config, tmp_path)
    assert [s for s, _ in phema.snapshot_steps(tmp_path)] == [2, 3]
