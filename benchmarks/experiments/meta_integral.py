"""The meta field's time integral: cost and accuracy of learning-rate time against the step-by-step grid.

For the shipped field (``pretrained:meta``), a held rate and four moving schedules ahead of an anchor, times
:func:`~lightning_gfm.flow.meta.basis_integrals` (learning-rate time, the default for one schedule) and the
step-by-step grid it replaced (one grid step per optimizer step where the rate moves), and prints each one's
relative error against a fine per-step quadrature (8 Simpson panels per optimizer step, each step at its own
rate); then the first and later meta forecasts of 10k scalars in a fresh process:

    python -m benchmarks.experiments.meta_integral
"""

from __future__ import annotations

import math
import time

import torch

import lightning_gfm.flow.meta as meta
from lightning_gfm.fields import load_field, resolve_field
from lightning_gfm.flow.meta import basis_integrals, time_features
from lightning_gfm.flow.ode import _torchdyn
from lightning_gfm.flow.window import Window

S_A, TOTAL, INTERVAL, N = 167.0, 1200.0, 17.0, 833
HORIZONS = [104, 208, 416, 833]


def schedules() -> dict[str, torch.Tensor]:
    """Learning rate of each of the next ``N + 1`` steps, ``(N + 1, 1)``, for each schedule."""
    i = torch.arange(N + 1, dtype=torch.float64)
    p = (S_A + i) / TOTAL
    cosine = 0.5 * (1 + torch.cos(math.pi * p))
    return {
        "held": torch.ones_like(i),
        "cosine": cosine,
        "step": 0.5 ** torch.floor(p * 4),
        "warm-up + cosine": torch.clamp((i + 1) / 300, max=1.0) * cosine,
        "one-cycle": torch.where(i < 400, (i + 1) / 400, 0.5 * (1 + torch.cos(math.pi * (i - 400) / 600)) + 1e-4),
    }


def quadrature(field, ratio: torch.Tensor) -> torch.Tensor:
    """Each horizon's ``sum_j ratio_j int_j^{j+1} phi``, 8 Simpson panels per step, ``(H, K)``."""
    t = torch.linspace(0, N, N * 8 + 1, dtype=torch.float64)
    with torch.no_grad():
        phi = field.phi(time_features(t.float(), S_A, TOTAL, INTERVAL)).double()
    w = torch.ones(9, dtype=torch.float64)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    per_step = torch.stack([(w[:, None] * phi[8 * j : 8 * j + 9]).sum(0) / 24 for j in range(N)])
    return torch.stack([(ratio[:h, None] * per_step[:h]).sum(0) for h in HORIZONS])


def timed(fn, repeats: int = 5) -> tuple[torch.Tensor, float]:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return out, (time.perf_counter() - start) / repeats


def main() -> None:
    torch.set_num_threads(1)
    _torchdyn()
    field = load_field(resolve_field("pretrained:meta"))
    print(f"horizons {HORIZONS} steps after an anchor at step {S_A:.0f} of {TOTAL:.0f}, record interval {INTERVAL}")
    for name, lr in schedules().items():
        lr = 1e-3 * lr.unsqueeze(1)
        exact = quadrature(field, (lr / lr[0])[:, 0])
        fast, t_fast = timed(lambda lr=lr: basis_integrals(field, lr, HORIZONS, S_A, TOTAL, INTERVAL))
        original = meta._integrate_in_lr_time
        meta._integrate_in_lr_time = lambda *a, **k: None  # the step-by-step grid
        try:
            slow, t_slow = timed(lambda lr=lr: basis_integrals(field, lr, HORIZONS, S_A, TOTAL, INTERVAL))
        finally:
            meta._integrate_in_lr_time = original

        def err(z, exact=exact):
            return float(((z[1:, 0].double() - exact).norm(dim=1) / exact.norm(dim=1)).max())

        print(
            f"  {name:17s} learning-rate time {t_fast:.4f} s (error {err(fast):.1e})   "
            f"step by step {t_slow:.4f} s (error {err(slow):.1e})"
        )


def first_calls() -> None:
    """A fresh process's first and later forecasts of 10k scalars (run as a subprocess)."""
    torch.set_num_threads(1)
    _torchdyn()
    field = load_field(resolve_field("pretrained:meta"))
    k, p = 20, 10_000
    steps = torch.arange(k, dtype=torch.float64) * 10
    w = torch.randn(k, p).cumsum(0) * 1e-3
    idx = torch.zeros(p, dtype=torch.long)
    win = Window(
        steps=steps,
        w=w,
        state={},
        lrs=torch.full((k, 1), 1e-3, dtype=torch.float64),
        opt_steps=steps,
        u=None,
        u_rms=torch.ones(p),
        u_rms_tensor=torch.ones(p),
        w_rms_tensor=w.square().mean(1, keepdim=True).sqrt(),
        roles=idx,
        tensor_index=idx,
        group_index=idx,
        interval=10.0,
        progress=torch.zeros(k),
    )
    lr = torch.full((501, 1), 1e-3, dtype=torch.float64)
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        meta.meta_forecast(field, win, "adam", lr, [125, 250, 500], 600, idx)
        seconds.append(time.perf_counter() - start)
    print("  forecasts: " + ", ".join(f"{s:.4f}" for s in seconds) + " s")


if __name__ == "__main__":
    import subprocess
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "--first-calls":
        first_calls()
    else:
        main()
        print("a fresh process (torchdyn imported first, as the callback does at fit start):")
        subprocess.run([sys.executable, "-m", "benchmarks.experiments.meta_integral", "--first-calls"], check=True)
