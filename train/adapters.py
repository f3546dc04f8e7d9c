"""The one LoRA fine-tuning loop of the LLM stages: ``train-rerank`` (:mod:`train.rerank`) and ``train-reasons``
(:mod:`train.reasons`) both run it.

Shuffled mini-batches for ``epochs`` epochs, AdamW over the adapter's parameters with a linear warm-up and decay,
gradients clipped to norm 1, a validation every ``eval_every`` steps (and at step 0: the zero-shot model) kept
by :class:`train.selection.BestStep`, and a stop at patience or at the time cap. The best step's adapter is
put back before it returns.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from towers.progress import tqdm
from train.selection import BestStep

logger = logging.getLogger(__name__)

MAX_GRAD_NORM = 1.0
WARMUP_SHARE = 10  # the rate warms up over the first 1/WARMUP_SHARE of the steps


@dataclass
class AdapterFit:
    best: BestStep  # the chosen step, its score, its kept state and every validation record
    steps: int  # optimiser steps taken
    out_of_time: bool  # stopped by the time cap


def adapter_optimizer(model: torch.nn.Module, lr: float, total: int):
    """``(params, optimizer, scheduler)`` for fine-tuning ``model``'s trainable parameters (its adapters): AdamW
    without weight decay, the rate warmed up linearly over the first tenth of ``total`` steps, then decayed
    linearly to 0."""
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / max(1, total // WARMUP_SHARE)) * max(0.0, 1 - s / total))
    return params, optim, sched


def fit_adapter(model, examples: Sequence, step_loss: Callable[[list], float],
                validate: Callable[[int, float], tuple[float, dict, object]], *, epochs: int, batch_size: int,
                lr: float, eval_every: int, patience: int, max_minutes: float, rng: random.Random,
                desc: str, progress: bool = True) -> AdapterFit:
    """Fine-tune ``model``'s adapter (LoRA already added) on ``examples``.

    ``step_loss(batch)`` computes a batch's loss, calls ``backward`` and returns its value. ``validate(step,
    mean_loss)`` runs with the model in eval mode and returns ``(score, record, extra)``: higher ``score`` is
    better, ``record`` goes into the history, and ``extra`` is kept beside the best step's adapter state
    (``best.state == (adapter_state, extra)``). ``eval_every`` 0 means once per epoch; ``max_minutes`` 0 means
    no time cap.
    """
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total = steps_per_epoch * epochs
    eval_every = eval_every or steps_per_epoch
    params, optim, sched = adapter_optimizer(model, lr, total)
    deadline = time.time() + 60 * max_minutes if max_minutes else math.inf
    best = BestStep(patience)

    def check(step: int, loss: float) -> bool:
        model.eval()
        score, record, extra = validate(step, loss)
        model.train()
        return best.update(step, score, lambda: (model.adapter_state(), extra), record)

    check(0, float("nan"))  # the adapter starts as the identity (LoRA B = 0): the zero-shot model
    step, stop, out_of_time, losses = 0, False, False, []
    bar = tqdm(total=total, desc=desc, disable=not progress)
    for _epoch in range(epochs):
        order = rng.sample(range(len(examples)), len(examples))
        for start in range(0, len(order), batch_size):
            optim.zero_grad(set_to_none=True)
            losses.append(step_loss([examples[i] for i in order[start:start + batch_size]]))
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optim.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
            out_of_time = time.time() > deadline
            if step % eval_every == 0 or out_of_time:
                stop = check(step, float(np.mean(losses[-eval_every:]))) or out_of_time
            if stop:
                break
        if stop:
            break
    if best.history[-1]["step"] != step:
        check(step, float(np.mean(losses[-eval_every:])))
    bar.close()
    if out_of_time:
        logger.info("%s stopped at its time cap (rerank.max_minutes=%g)", desc, max_minutes)
    model.load_adapter_state(best.state[0])
    model.eval()
    return AdapterFit(best, step, out_of_time)
