"""EDM (Karras et al. 2022) on the digits quickstart: the network, data, iterations and evaluation of
configs/vp_digits.py with EDM's formulation — σ(t) = t on [0.002, 80], the preconditioned denoiser
(c_skip, c_out, c_in, c_noise; σ_data = 0.5), the loss weighting λ(σ) with log-normal σ, and Heun's sampler on
the ρ = 7 grid with the quickstart's number of score evaluations (2·251 − 1 = 501).
    python main.py --config configs/edm_digits.py --mode train && python main.py --config configs/edm_digits.py --mode eval
"""
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("vp_digits", Path(__file__).with_name("vp_digits.py"))
_vp_digits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_vp_digits)


def get_config():
    config = _vp_digits.get_config()
    training = config.training
    training.sde = "edm"
    training.loss = "edm"

    model = config.model
    model.parameterization = "edm"
    model.noise_conditioning = "log_sigma"
    model.sigma_data = 0.5
    model.sigma_min = 0.002
    model.sigma_max = 80.0

    sampling = config.sampling
    sampling.method = "heun"
    sampling.grid = "edm"
    sampling.rho = 7.0
    sampling.steps = 251  # 2·251 − 1 = 501 score calls, as the VP quickstart's 500 Euler–Maruyama steps + denoising
    sampling.noise_removal = False  # Heun's last step is already Euler to σ_min
    return config
