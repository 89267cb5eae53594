"""A few-step student of the EDM digits model (configs/edm_digits.py, trained into runs/edm_digits): consistency
distillation by default, progressive distillation with --config.distill.method=progressive, consistency training
from the teacher's weights with --config.distill.method=consistency_training. Each distills in under 15 minutes on
2 CPU cores (BENCHMARKS.md, "Few-step students of the EDM digits model"):

    python main.py --config configs/edm_digits.py --mode train --workdir runs/edm_digits
    python main.py --config configs/cd_digits.py --mode distill --workdir runs/cd_digits
    python main.py --config configs/cd_digits.py --mode compare --workdir runs/cd_digits

The student keeps the teacher's network; model.parameterization="auto" and sampling.method="auto" make it the
method's model and sampler (a consistency model sampled in 1 step; DDIM at distill.steps on the "edm" grid).
"""
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("edm_digits", Path(__file__).with_name("edm_digits.py"))
_edm_digits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_edm_digits)


def get_config():
    config = _edm_digits.get_config()
    distill = config.distill
    distill.method = "consistency"
    distill.teacher_workdir = "runs/edm_digits"
    distill.levels = 18  # Song et al.'s N for CIFAR-10
    distill.steps = 4  # progressive: 64 → 32 → 16 → 8 → 4 DDIM steps, training.n_iters / 4 steps per round
    distill.teacher_steps = 64

    training = config.training
    training.n_iters = 1000
    training.snapshot_freq = 1000
    training.snapshot_freq_for_preemption = 250
    training.log_freq = 100
    training.eval_freq = 250

    config.model.parameterization = "auto"  # the student's: consistency, or the teacher's edm (progressive)
    config.optim.lr = 2e-3  # the teacher's
    config.optim.warmup = 50

    sampling = config.sampling
    sampling.method = "auto"  # consistency at 1 step, or DDIM at distill.steps (progressive)
    sampling.steps = None
    sampling.grid = None
    config.eval.enable_bpd = False  # a few-step sampler has no likelihood of its own
    # one table: the student with its own sampler at 1, 2 and 4 steps, the teacher at its default sampler (Heun, 501
    # score calls) and with the training-free solvers at 5 and 10 calls
    config.compare.samplers = ("auto@1,2,4",)
    config.compare.teacher_samplers = ("heun@251", "heun@3,5", "ddim@5,10", "dpm_solver@5,10", "deis@5,10",
                                       "dpm_solver_sde@5,10")
    return config
