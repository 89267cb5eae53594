"""Rectified flow (flow matching) on the digits quickstart: the network, data, iterations and evaluation of
configs/vp_digits.py with SD3's objective (Esser et al. 2024) — x_t = (1 − t)·x_0 + t·ε, the network predicts the
velocity ε − x_0 (plain MSE on it), training times t = sigmoid(u), u ~ N(0, 1) — sampled with the
probability-flow ODE by DPM-Solver++ on the λ-uniform grid.
    python main.py --config configs/rf_digits.py --mode train && python main.py --config configs/rf_digits.py --mode eval
"""
from configs import vp_digits


def get_config():
    config = vp_digits.get_config()
    training = config.training
    training.sde = "rectified_flow"
    training.time_sampling = "logit_normal:mean=0,std=1"
    training.weighting = "velocity"

    config.model.parameterization = "velocity"

    sampling = config.sampling
    sampling.method = "dpm_solver"
    sampling.steps = 50  # its documented count
    return config
