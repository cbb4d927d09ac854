"""Learning-rate schedules built from MLX's own schedulers.

Index convention (MLX): the optimizer evaluates the schedule at the number of updates already done,
before incrementing it, so the first update uses lr(0).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim

from .settings import OptimizerSettings, ScheduleSettings


def make_schedule(opt: OptimizerSettings, sched: ScheduleSettings):
    if sched.kind == "constant":
        return opt.lr
    cosine = optim.cosine_decay(opt.lr, sched.decay_steps, sched.end_lr)
    if sched.warmup_steps == 0:
        return cosine
    warmup = optim.linear_schedule(sched.warmup_init, opt.lr, sched.warmup_steps)
    return optim.join_schedules([warmup, cosine], [sched.warmup_steps])


def lr_at(opt: OptimizerSettings, sched: ScheduleSettings, step: int) -> float:
    """The learning rate of the update that follows `step` earlier updates."""
    schedule = make_schedule(opt, sched)
    return float(schedule(mx.array(step))) if callable(schedule) else float(schedule)
