"""EDM2 (Karras et al. 2024) on the digits quickstart: EDM's formulation and sampler as configs/edm_digits.py, with
EDM2's magnitude-preserving U-Net (model.name = "edm2": forced weight normalization, no biases or normalization
layers, the learned log-variance u(σ) in the loss), Adam at EDM2's higher learning rate with its inverse-square-root
decay, and post-hoc EMA: two power-function profiles (σ_rel 0.05 and 0.10) snapshotted every 50 steps, from which
`--mode ema_sweep` rebuilds and scores the EMA of every σ_rel in eval.ema_sweep.
    python main.py --config configs/edm2_digits.py --mode train
    python main.py --config configs/edm2_digits.py --mode ema_sweep
    python main.py --config configs/edm2_digits.py --mode eval --config.eval.ema_sigma_rel=0.025
"""
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("edm_digits", Path(__file__).with_name("edm_digits.py"))
_edm_digits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_edm_digits)


def get_config():
    config = _edm_digits.get_config()
    training = config.training
    training.post_hoc_ema = (0.05, 0.10)
    training.post_hoc_ema_freq = 50  # 25 snapshots: each σ_rel of eval.ema_sweep within 4.5 % of its density

    model = config.model
    model.name = "edm2"
    model.nf = 32
    model.ch_mult = (1, 2, 2)
    model.num_res_blocks = 1
    model.attn_resolutions = (4,)
    model.attention_head_dim = 32  # two heads of 32 channels at the 64-channel levels
    model.dropout = 0.0

    optim = config.optim
    optim.lr = 1e-2  # the normalized weights take EDM2's larger steps
    optim.schedule = "inverse_sqrt"
    optim.ref_steps = 500
    optim.warmup = 100
    optim.grad_clip = -1.0  # EDM2 trains without clipping

    config.eval.ema_sweep = (0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25)
    return config
