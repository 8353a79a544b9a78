"""The optimizer-aware dynamics reproduce each optimizer's real update rule."""

import copy

import pytest
import torch

from lightning_gfm.dynamics import (
    calls_needed,
    dynamics_for,
    future_learning_rates,
    lr_by_step,
    read_state,
    step_count,
    write_state,
)
from lightning_gfm.params import ParamSpec

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.01),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, weight_decay=0.01),
    "rmsprop_momentum": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5),
    "rmsprop_centered": lambda p: torch.optim.RMSprop(p, lr=1e-2, centered=True),
    "maximize": lambda p: torch.optim.Adam(p, lr=1e-2, maximize=True),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-2, weight_decay=0.01),
    "nadamw": lambda p: torch.optim.NAdam(p, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    "nadam_no_decay_schedule": lambda p: torch.optim.NAdam(p, lr=1e-2, momentum_decay=0.0),
    "radam": lambda p: torch.optim.RAdam(p, lr=1e-2, weight_decay=0.01),
    "radam_rectified": lambda p: torch.optim.RAdam(p, lr=1e-2, betas=(0.9, 0.9)),
    "radamw": lambda p: torch.optim.RAdam(p, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1, decoupled_weight_decay=True),
    "adamax": lambda p: torch.optim.Adamax(p, lr=1e-2, weight_decay=0.01),
    "adamax_maximize": lambda p: torch.optim.Adamax(p, lr=1e-2, maximize=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2, weight_decay=0.01),
    "adagrad_decay": lambda p: torch.optim.Adagrad(p, lr=1e-2, lr_decay=0.1, initial_accumulator_value=0.5),
    # the multi-tensor and fused implementations of the supported optimizers update the same state
    "sgd_foreach": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=True),
    "sgd_fused": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01, fused=True),
    "adam_foreach": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True),
    "adam_fused": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.01, fused=True),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
    "rmsprop_foreach": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5, foreach=True),
    "nadam_foreach": lambda p: torch.optim.NAdam(p, lr=1e-2, foreach=True),
    "radam_foreach": lambda p: torch.optim.RAdam(p, lr=1e-2, betas=(0.9, 0.9), foreach=True),
    "adamax_foreach": lambda p: torch.optim.Adamax(p, lr=1e-2, foreach=True),
    "adagrad_fused": lambda p: torch.optim.Adagrad(p, lr=1e-2, fused=True),
}


def _setup(name, steps_before=3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    opt = OPTIMIZERS[name](model.parameters())
    x = torch.randn(16, 5)

    def grad():
        opt.zero_grad()
        model(x).pow(2).mean().backward()

    for _ in range(steps_before):
        grad()
        opt.step()
    return model, opt, grad


@pytest.mark.parametrize("steps_before", [3, 12])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_one_euler_step_is_one_optimizer_step(name, steps_before):
    # 12 steps: RAdam past its un-rectified start (rho_t > 5), NAdam's mu schedule further along
    model, opt, grad = _setup(name, steps_before)
    spec = ParamSpec.from_module(model, opt)
    dyn = dynamics_for(opt, spec)
    grad()
    g = spec.flatten([p.grad for p in spec.params])
    w = spec.flatten()
    state = read_state(opt, spec, dyn.state_names)
    lr = torch.full_like(w, opt.param_groups[0]["lr"])
    dw, dstate = dyn.velocity(w, state, g, lr, torch.tensor(float(step_count(opt, spec))))
    opt.step()
    torch.testing.assert_close(w + dw, spec.flatten(), rtol=1e-5, atol=1e-7)
    after = read_state(opt, spec, dyn.state_names)
    for key in dyn.state_names:
        torch.testing.assert_close(state[key] + dstate[key], after[key], rtol=1e-5, atol=1e-8)


def _steady(p, opt, g, steps, pin=None):
    """Step ``opt`` ``steps`` times on the constant gradient ``g`` (weights reset to ``pin`` after each step when
    given); return ``spec, dyn, state, lr, k`` as the callback reads them."""
    for _ in range(steps):
        p.grad = g.clone()
        opt.step()
        if pin is not None:
            with torch.no_grad():
                p.copy_(pin)
    module = torch.nn.Module()
    module.p = p
    spec = ParamSpec.from_module(module, opt)
    dyn = dynamics_for(opt, spec)
    lr = torch.full((p.numel(),), opt.param_groups[0]["lr"])
    return spec, dyn, read_state(opt, spec, dyn.state_names), lr, torch.tensor(float(step_count(opt, spec)))


@pytest.mark.parametrize("name", ["momentum", "adam", "rmsprop_momentum", "nadam", "radam", "adamax"])
def test_gradient_estimate_recovers_a_constant_gradient(name):
    # With a constant gradient the moments converge to their steady state, where the estimate is exact.
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(6))
    opt = OPTIMIZERS[name]([p])
    g_true = torch.linspace(-1, 1, 6)
    for group in opt.param_groups:
        group["weight_decay"] = 0.0
    spec, dyn, state, lr, k = _steady(p, opt, g_true, 400)
    g0 = dyn.gradient_estimate(spec.flatten(), state, torch.zeros(6), lr, k)
    torch.testing.assert_close(g0, g_true, rtol=1e-3, atol=1e-4)
    # the same gradient, read back from the steady velocity through the optimizer's preconditioning
    w_before = spec.flatten()
    p.grad = g_true.clone()
    opt.step()
    u = spec.flatten() - w_before
    g_u = dyn.gradient_from_velocity(w_before, state, u, lr, k)
    torch.testing.assert_close(g_u, g_true, rtol=1e-2, atol=1e-3)


MAXIMIZE_DECAY = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.05, maximize=True),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.05, maximize=True),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.05, maximize=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.05, maximize=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05, maximize=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, weight_decay=0.05, maximize=True),
    "rmsprop_momentum": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5, weight_decay=0.05, maximize=True),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-2, weight_decay=0.05, maximize=True),
    "radam": lambda p: torch.optim.RAdam(p, lr=1e-2, weight_decay=0.05, maximize=True),
    "adamax": lambda p: torch.optim.Adamax(p, lr=1e-2, weight_decay=0.05, maximize=True),
}


@pytest.mark.parametrize("name", list(MAXIMIZE_DECAY))
def test_gradient_estimates_invert_maximize_with_coupled_decay(name):
    # The weights are pinned at w0 after every step, so the state reaches the steady state of the held gradient
    # at w0 (coupled decay included); maximization flips the loss gradient, never the decay term.
    torch.manual_seed(0)
    w0 = torch.linspace(-2, 2, 6)
    p = torch.nn.Parameter(w0.clone())
    opt = MAXIMIZE_DECAY[name]([p])
    g_true = torch.linspace(1, -0.5, 6)
    spec, dyn, state, lr, k = _steady(p, opt, g_true, 600, pin=w0)
    p.grad = g_true.clone()
    opt.step()
    u = spec.flatten() - w0  # the steady velocity at w0
    torch.testing.assert_close(dyn.gradient_estimate(w0, state, u, lr, k), g_true, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(dyn.gradient_from_velocity(w0, state, u, lr, k), g_true, rtol=1e-2, atol=1e-3)


def test_sgd_gradient_estimate_from_velocity():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.1)
    module = torch.nn.Module()
    module.p = p
    spec = ParamSpec.from_module(module, opt)
    dyn = dynamics_for(opt, spec)
    u = torch.tensor([-0.1, 0.2, 0.0])  # velocity = -lr * g
    g0 = dyn.gradient_estimate(torch.zeros(3), {}, u, torch.full((3,), 0.1), torch.tensor(0.0))
    torch.testing.assert_close(g0, torch.tensor([1.0, -2.0, 0.0]))


def test_unsupported_optimizer_names_the_supported_ones():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.Adadelta(model.parameters())
    with pytest.raises(
        ValueError, match=r"SGD, Adam, AdamW, RMSprop, NAdam, RAdam, Adamax, Adagrad.*Adadelta.*generic"
    ):
        dynamics_for(opt, ParamSpec.from_module(model, opt))
    assert dynamics_for(opt, ParamSpec.from_module(model, opt), generic=True).state_names == ()


def test_amsgrad_is_refused():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.Adam(model.parameters(), amsgrad=True)
    with pytest.raises(ValueError, match="amsgrad"):
        dynamics_for(opt, ParamSpec.from_module(model, opt))


def test_param_groups_give_per_scalar_hyperparameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    opt = torch.optim.Adam(
        [{"params": model[0].parameters(), "betas": (0.8, 0.99)}, {"params": model[1].parameters()}], lr=1e-3
    )
    spec = ParamSpec.from_module(model, opt)
    dyn = dynamics_for(opt, spec)
    beta1 = dyn.h("beta1", torch.zeros(spec.numel))
    assert beta1[: 3 * 2 + 2].eq(0.8).all() and beta1[8:].eq(0.9).all()


def test_future_learning_rates_replays_without_disturbing():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for _ in range(3):
        opt.step()
        sched.step()
    before_sched, before_lr = copy.deepcopy(sched.state_dict()), opt.param_groups[0]["lr"]
    rows = future_learning_rates(opt, sched, 4)
    assert sched.state_dict() == before_sched and opt.param_groups[0]["lr"] == before_lr
    real = [opt.param_groups[0]["lr"]]
    for _ in range(4):
        opt.step()
        sched.step()
        real.append(opt.param_groups[0]["lr"])
    torch.testing.assert_close(rows[:, 0], torch.tensor(real, dtype=torch.float64))


def test_lr_by_step_expands_epoch_schedules():
    calls = torch.tensor([[1.0], [0.5], [0.25]], dtype=torch.float64)
    rows = lr_by_step(calls, horizon=5, every=3, offset=1)  # 1 step into a 3-step epoch
    assert rows[:, 0].tolist() == [1.0, 1.0, 0.5, 0.5, 0.5, 0.25]
    assert calls_needed(5, 3, 1) == 2


def test_write_state_round_trip():
    model, opt, _ = _setup("adam")
    spec = ParamSpec.from_module(model, opt)
    state = read_state(opt, spec, ("exp_avg",))
    write_state(opt, spec, {"exp_avg": state["exp_avg"] * 2})
    torch.testing.assert_close(read_state(opt, spec, ("exp_avg",))["exp_avg"], state["exp_avg"] * 2)


@pytest.mark.parametrize("name", ["adam", "adamw", "rmsprop"])
def test_held_gradient_noise_keeps_the_second_moment_where_the_run_keeps_it(name):
    # A real run on noisy gradients g_t = mean + sd * z_t: the second moment settles at mean^2 + sd^2. Forecast
    # with the mean gradient alone, the ODE would drain it towards mean^2 (and inflate every later step);
    # with the noise implied at the anchor held, it stays put.
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.zeros(4000))
    opt = OPTIMIZERS[name](module.parameters())
    mean, sd = torch.randn(4000) * 0.1, 1.0
    for _ in range(3000):
        opt.zero_grad()
        module.w.grad = mean + sd * torch.randn(4000)
        opt.step()
    spec = ParamSpec.from_module(module, opt)
    dyn = dynamics_for(opt, spec)
    state0 = read_state(opt, spec, dyn.state_names)
    w0, k0 = spec.flatten(), float(step_count(opt, spec))
    second = "exp_avg_sq" if "exp_avg_sq" in state0 else "square_avg"
    lr = torch.full((4000,), 1e-2)
    loss_grad = mean  # the weights stay tiny: the coupled decay term is negligible
    noise = dyn.gradient_noise(w0, state0, loss_grad, k0)
    assert float(noise.mean()) == pytest.approx(sd**2, rel=0.1)

    def run(noise):
        w, state = w0.clone(), {n: v.clone() for n, v in state0.items()}
        with torch.no_grad():
            for s in range(300):
                dw, dst = dyn.velocity(w, state, loss_grad, lr, k0 + s, noise=noise)
                w = w + dw
                state = {n: state[n] + dst[n] for n in state}
        return float(state[second].mean() / state0[second].mean())

    assert run(noise) == pytest.approx(1.0, abs=0.03)
    assert run(None) < 0.8  # without the noise the preconditioner drains


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_jump_to_the_runs_own_future_state_continues_as_the_run_does(name):
    # Oracle: a path whose point is the run's own state h steps ahead. Jumping there with the `forecast` policy
    # (the weights and the state the ODE carried, the step counter advanced where the update reads it) and taking
    # one more step must give the run's own next step: bias corrections, NAdam's mu_product, RAdam's rectification
    # and Adagrad's lr decay all follow the counter (docs/experiments.md, E50).
    from lightning_gfm.forecast import ForecastPath
    from lightning_gfm.jump import StatePolicy, apply_state_policy

    s, h = 4, 9
    run, opt_run, grad_run = _setup(name, s)
    jumped, opt_jumped, grad_jumped = _setup(name, s)
    spec_run, spec = ParamSpec.from_module(run, opt_run), ParamSpec.from_module(jumped, opt_jumped)
    dyn = dynamics_for(opt_jumped, spec)
    for _ in range(h):
        grad_run()
        opt_run.step()
    names = dyn.state_names
    here, ahead = read_state(opt_jumped, spec, names), read_state(opt_run, spec_run, names)
    path = ForecastPath(
        [0, h],
        torch.stack([spec.flatten(), spec_run.flatten()]),
        {n: torch.stack([here[n], ahead[n]]) for n in names},
        0.0,
    )
    spec.write_(path.weights[1])
    apply_state_policy(opt_jumped, spec, StatePolicy.FORECAST, path, 1, dyn)
    assert step_count(opt_jumped, spec) == step_count(opt_run, spec_run)
    for grad, opt in ((grad_run, opt_run), (grad_jumped, opt_jumped)):
        grad()
        opt.step()
    torch.testing.assert_close(spec.flatten(), spec_run.flatten(), rtol=1e-6, atol=1e-7)
    for p, q in zip(spec.params, spec_run.params, strict=True):
        for key, value in opt_run.state[q].items():
            torch.testing.assert_close(torch.as_tensor(opt_jumped.state[p][key]), torch.as_tensor(value))


def test_a_jump_without_forecast_state_keeps_the_step_counter():
    from lightning_gfm.forecast import ForecastPath
    from lightning_gfm.jump import StatePolicy, apply_state_policy

    model, opt, _ = _setup("adam", 4)
    spec = ParamSpec.from_module(model, opt)
    dyn = dynamics_for(opt, spec)
    w = spec.flatten()
    # linear extrapolation and the oracle carry no state: the moments and the counter both stay the anchor's
    apply_state_policy(opt, spec, StatePolicy.FORECAST, ForecastPath([0, 7], torch.stack([w, w]), {}, 0.0), 1, dyn)
    assert step_count(opt, spec) == 4
    state = read_state(opt, spec, dyn.state_names)
    path = ForecastPath([0, 7], torch.stack([w, w]), {n: torch.stack([v, v]) for n, v in state.items()}, 0.0)
    apply_state_policy(opt, spec, StatePolicy.KEEP, path, 1, dyn)
    assert step_count(opt, spec) == 4
    # a point whose state is another point's (the meta field's take the prior's): the counter goes with the state
    path.state_steps = [0, 3]
    apply_state_policy(opt, spec, StatePolicy.FORECAST, path, 1, dyn)
    assert step_count(opt, spec) == 7
