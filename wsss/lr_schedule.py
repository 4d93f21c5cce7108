"""Learning rates: ``param_groups`` (the pretrained body at lr, new layers at ``new_lr_mult``
x lr) and ``build_scheduler`` (poly, step or constant decay, a LambdaLR stepped once per
optimizer step)."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import torch
from torch import nn


def param_groups(backbone_params: Iterable[nn.Parameter], new_params: Iterable[nn.Parameter], lr: float,
                 weight_decay: float = 0.0, new_lr_mult: float = 10.0, bias_lr_mult: float = 1.0,
                 biases: Iterable[nn.Parameter] = ()) -> list[dict]:
    """SGD groups (METHOD.md sec 1, reference training): pretrained backbone at ``lr``, new
    layers at ``new_lr_mult * lr``; weight decay on all. With ``bias_lr_mult != 1`` the
    parameters listed in ``biases`` get their own group per part at ``bias_lr_mult`` times
    its lr (the reference: 2x, i.e. 1, 2, 10, 20 x lr, Classifier/scripts/train.py:66-70).
    Frozen parameters are left out."""
    groups = []
    bias_ids = {id(p) for p in biases}
    for name, params, mult in (("backbone", backbone_params, 1.0), ("new", new_params, new_lr_mult)):
        params = [p for p in params if p.requires_grad]
        if bias_lr_mult != 1.0:
            weights = [p for p in params if id(p) not in bias_ids]
            biases_here = [p for p in params if id(p) in bias_ids]
            parts = [(name, weights, mult), (f"{name}_bias", biases_here, mult * bias_lr_mult)]
        else:
            parts = [(name, params, mult)]
        groups += [{"name": n, "params": ps, "lr": lr * m, "weight_decay": weight_decay} for n, ps, m in parts]
    return [g for g in groups if g["params"]]


def lr_factor(step: int, *, schedule: str, total_steps: int, steps_per_epoch: int,
              step_epochs: Sequence[int] = (), gamma: float = 0.1, power: float = 0.9) -> float:
    """Multiplier of the base learning rate after ``step`` optimizer steps.

    poly: (1 - step / total_steps) ** power; step: gamma ** (number of milestones in
    ``step_epochs`` already reached, counted in whole epochs); constant: 1.
    """
    if schedule == "poly":
        return max(0.0, 1.0 - step / max(1, total_steps)) ** power
    if schedule == "step":
        epoch = step // max(1, steps_per_epoch)
        return gamma ** sum(epoch >= int(e) for e in step_epochs)
    if schedule == "constant":
        return 1.0
    raise ValueError(f"schedule must be 'poly', 'step' or 'constant', got {schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, *, schedule: str, total_steps: int, steps_per_epoch: int,
                    step_epochs: Sequence[int] = (), gamma: float = 0.1, power: float = 0.9
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR to be stepped after every optimizer step (see ``lr_factor``)."""
    lr_factor(0, schedule=schedule, total_steps=total_steps, steps_per_epoch=steps_per_epoch)  # validates
    # A partial, not a lambda: picklable, and LambdaLR does not store its arguments in the
    # state dict, so a resumed run follows the schedule of its (possibly longer) config.
    fn = functools.partial(lr_factor, schedule=schedule, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                           step_epochs=tuple(step_epochs), gamma=gamma, power=power)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
