"""sde_diffusion: score-based generative modeling with SDEs (Song et al., ICLR 2021) in plain PyTorch."""
__version__ = "0.1.0"
