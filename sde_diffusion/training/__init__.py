"""Training: the objective's parts (weightings.py, noise_levels.py, objectives.py) and the optimizer (optim.py).

`sde_diffusion.losses` is the public face of the objective: it re-exports what these modules define.
"""
