"""--mode tune_grid: a time grid tuned for one sampler and NFE budget on one checkpoint (EMA weights), written as
JSON that sampling.grid or a compare entry's `grid=` option names."""
from __future__ import annotations

import logging
from pathlib import Path

from .. import sampling
from ..sampling.settings import resolved_method
from ..validation import validate_config
from . import builder
from ..errors import ConfigError
from .generation import make_conditioning

log = logging.getLogger("sde_diffusion")


def tuned_sampler(config):
    """(method, options) from tune.sampler, or sampling.method with the options config.sampling gives it."""
    if config.tune.sampler:
        try:
            return sampling.parse_spec(config.tune.sampler)
        except ValueError as err:
            raise ConfigError(f"tune.sampler={config.tune.sampler!r}: {err}") from None
    return resolved_method(config), sampling.options_from_config(config)


def run(config, workdir) -> Path:
    """Tune the grid and write it (tune.out or workdir/grids/<method>_nfe<nfe>.json); returns the file."""
    validate_config(config)
    builder.check_post_hoc_ema(config, workdir)
    method, options = tuned_sampler(config)
    spec_keys = {k: options.pop(k) for k in list(options) if k in sampling.registry.SPEC_KEYWORDS}
    if config.tune.nfe < 1 or config.tune.batch < 1:
        raise ConfigError(f"tune.nfe and tune.batch must be ≥ 1, got {config.tune.nfe}, {config.tune.batch}")
    builder.require_one_process("tune_grid")
    workdir = Path(workdir)
    device = builder.resolve_device(config.device)
    builder.seed_everything(config.seed)
    sde, dataset, model = builder.build(config, device, workdir=workdir)
    k, path = builder.chosen_checkpoint(workdir, config.tune.checkpoint, "tune.checkpoint")
    builder.load_weights(path, model, dataset, config)
    model.eval()
    score_fn = make_conditioning(config, sde, model, dataset, workdir, device).score_fn(0, config.tune.batch, device)
    denoise = bool(spec_keys.get("denoise", config.sampling.noise_removal))
    eps = spec_keys.get("eps", config.sampling.eps)
    start = spec_keys.get("grid", config.sampling.grid if config.sampling.grid in sampling.GRIDS else None)
    report = {}
    times = sampling.tune_grid(score_fn, sde, (config.tune.batch, *dataset.shape), method, config.tune.nfe,
                               denoise=denoise, eps=eps, start=start, rho=spec_keys.get("rho", config.sampling.rho),
                               width=spec_keys.get("width", config.sampling.width),
                               seed=config.seed, device=device, report=report, **options)
    out = Path(config.tune.out) if config.tune.out else workdir / "grids" / f"{method}_nfe{config.tune.nfe}.json"
    sampling.save_grid(out, times, **report, options=options, denoise=denoise, checkpoint=path.name,
                       sde=type(sde).__name__)
    log.info("tuned %s for NFE %d on %s: RMS to the ODE solution %.4g → %.4g; wrote %s (use sampling.grid=%s)",
             method, config.tune.nfe, path.name, report["rms_start"], report["rms_tuned"], out, out)
    return out
