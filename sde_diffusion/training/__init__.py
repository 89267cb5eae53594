"""Training: the objective's parts (noise_levels.py, weightings.py, objectives.py), the optimizer and learning-rate
schedule (optim.py), one optimization step (step.py: precision, clipping, non-finite checks) and the EMA (ema.py).

`sde_diffusion.losses` is the public face of the objective: it re-exports what these modules define.
"""
