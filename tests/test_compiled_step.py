"""training.compile: the step's three device parts (loss with the network and its backward; checks and clipping;
loss scale and EMA) each compile to one graph, compile once for every step, and update the weights, the EMA and
Adam's state exactly as the eager step does (dynamo's eager backend; aot_eager adds AOTAutograd's traced backward)."""
from __future__ import annotations

import pytest
import torch

import run_lib
from configs.edm_digits import get_config as edm_digits_config
from configs.toy_gmm import get_config
from sde_diffusion.training import optim
from sde_diffusion.training.ema import ExponentialMovingAverage
from sde_diffusion.jobs import builder
from sde_diffusion.training.step import TrainStep
from tests.test_crash_safety import NaNAt

STEPS = 4


class GraphCounter:
    """A torch.compile backend that runs each captured graph as it is and counts the graphs."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


def small_config(precision="fp32", num_classes=4):
    config = get_config()
    config.training.batch_size, config.training.precision = 16, precision
    config.model.num_classes, config.training.label_dropout = num_classes, 0.25
    config.optim.grad_clip = 0.05  # small enough that clipping acts
    config.device = "cpu"
    return config


def run_steps(config, backend=None, loss_wrapper=None):
    """STEPS steps of a fresh model on fixed batches and labels; returns (step_fn, model, ema, optimizer)."""
    torch.manual_seed(0)
    sde = builder.sde_from_config(config)
    model = builder.create_model(config)
    optimizer = optim.make_optimizer(model.parameters(), config.optim)
    ema = ExponentialMovingAverage(model.parameters(), decay=0.9)
    loss_fn = builder.make_loss_fn(config, sde)
    step_fn = TrainStep(model, optimizer, ema, loss_wrapper(loss_fn) if loss_wrapper else loss_fn, config.optim,
                        precision=config.training.precision, device=torch.device("cpu"),
                        on_nonfinite=config.training.on_nonfinite, noise=torch.Generator().manual_seed(1),
                        compile_backend=backend)
    score_fn_for = builder.labelled_score_fn(config, sde, model)
    data = torch.Generator().manual_seed(2)
    for step in range(1, STEPS + 1):
        x = torch.randn(16, 2, generator=data)
        labels = torch.randint(0, 5, (16,), generator=data)  # 4 = the null label of dropout
        step_fn(x, step, score_fn_for(labels))  # a new score-function closure every step, as in training
    return step_fn, model, ema, optimizer


def assert_same_state(a, b, exact=True):
    check = torch.equal if exact else (lambda u, v: torch.allclose(u, v, rtol=1e-5, atol=1e-7))
    (_, model_a, ema_a, opt_a), (_, model_b, ema_b, opt_b) = a, b
    for u, v in zip(model_a.parameters(), model_b.parameters()):
        assert check(u, v)
    for u, v in zip(ema_a.shadow_params, ema_b.shadow_params):
        assert check(u, v)
    for u, v in zip(opt_a.state.values(), opt_b.state.values()):
        assert all(check(u[k], v[k]) for k in ("exp_avg", "exp_avg_sq", "step"))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_compiled_step_is_three_whole_graphs_compiled_once_and_equals_eager(precision):
    config = small_config(precision)
    counter = GraphCounter()
    compiled = run_steps(config, counter)
    assert compiled[0].fullgraph and counter.graphs == 3  # loss, checks + clipping, scale + EMA: no recompiles
    eager = run_steps(config)
    assert_same_state(eager, compiled)
    assert compiled[0].report() == eager[0].report()  # fp16: the same overflows skipped, the same loss scale
    if precision == "fp16":
        assert torch.equal(compiled[0].scaler.scale, eager[0].scaler.scale)


def test_edm2_loss_is_one_graph_and_equals_eager():
    """EDM2's forced weight normalization (an in-place update of every weight in a training forward) and its learned
    uncertainty's loss term trace into one whole graph (the compiled step's loss), which gives eager's losses,
    gradients and weights over two calls. A minimal class-conditional EDM2 U-Net: one level, three blocks."""
    config = edm_digits_config()
    m = config.model
    m.name, m.nf, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.num_classes = "edm2", 8, (1,), 0, (), 10
    sde = builder.sde_from_config(config)
    loss_fn = builder.make_loss_fn(config, sde)
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    noise = loss_fn.draw(x, torch.Generator().manual_seed(1))
    runs = []
    for backend in (None, GraphCounter()):
        torch.manual_seed(0)
        model = builder.create_model(config).train()
        score_fn = builder.labelled_score_fn(config, sde, model)(torch.arange(8))
        loss = lambda: loss_fn(score_fn, x, noise=noise)  # noqa: E731
        if backend is not None:
            loss = torch.compile(loss, backend=backend, fullgraph=True)
        values = [loss() for _ in range(2)]
        sum(values).backward()
        runs.append((torch.stack(values).detach(), [p.grad for p in model.parameters()],
                     [p.detach() for p in model.parameters()]))
    assert backend.graphs == 1
    for eager, compiled in zip(*runs):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_aot_autograd_backward_matches_eager():
    """aot_eager traces the backward too (inductor's path without its code generation)."""
    config = small_config()
    assert_same_state(run_steps(config), run_steps(config, "aot_eager"), exact=False)


def test_compiled_step_masks_a_failed_step_as_the_eager_one_does():
    config = small_config()
    config.training.on_nonfinite = "skip"
    wrap = lambda loss_fn: NaNAt(loss_fn, {2})  # a plain callable (no `draw`): the loss compiles with graph breaks
    compiled, eager = run_steps(config, "eager", wrap), run_steps(config, None, wrap)
    assert not compiled[0].fullgraph
    assert_same_state(eager, compiled)
    assert compiled[0].report().skipped == 1 and int(compiled[2].num_updates) == STEPS - 1


@pytest.mark.usefixtures("one_thread")
def test_training_compile_config_compiles_the_step(tmp_path):
    config = small_config()
    t = config.training
    t.n_iters, t.log_freq, t.snapshot_freq, t.snapshot_sampling = 3, 1, 3, False
    t.compile, t.compile_backend = True, "eager"
    state = run_lib.train(config, tmp_path)
    assert state.step == 3 and all(torch.isfinite(p).all() for p in state.model.parameters())
