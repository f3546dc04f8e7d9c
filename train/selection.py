"""Model selection shared by both training loops: early stopping on validation NDCG@10, keeping a copy of
the best epoch's weights, and one history record per epoch."""

from __future__ import annotations

import logging

from towers.factory import TwoTower, trainable_state

logger = logging.getLogger(__name__)


class BestEpoch:
    """Tracks validation NDCG@10; ``update`` says when ``patience`` epochs passed without improvement."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best, self.epoch, self.bad, self.state = -1.0, -1, 0, None
        self.history: list[dict] = []

    def update(self, model: TwoTower, epoch: int, loss: float, valid: dict, **extra) -> bool:
        """Record an epoch; keep its weights if it is the best so far. Returns True when training should stop."""
        record = {"epoch": epoch, "loss": loss, **extra,
                  "temperature": float(1 / model.logit_scale.detach().exp().clamp(max=100)), **valid}
        self.history.append(record)
        logger.info("epoch %d loss %.4f valid recall@10 %.4f ndcg@10 %.4f", epoch, loss,
                    valid["recall@10"], valid["ndcg@10"])
        if valid["ndcg@10"] > self.best:
            self.best, self.epoch, self.bad = valid["ndcg@10"], epoch, 0
            self.state = trainable_state(model)  # a copy (see trainable_state); frozen backbones never change
        else:
            self.bad += 1
        return self.stopped

    @property
    def stopped(self) -> bool:
        return self.bad >= self.patience

    def restore(self, model: TwoTower) -> None:
        """Put the best epoch's weights back into ``model`` (in eval mode)."""
        if self.state is not None:
            model.load_state_dict(self.state, strict=False)
        model.eval()

    def state_dict(self) -> dict:
        return {"best": self.best, "epoch": self.epoch, "bad": self.bad, "state": self.state,
                "history": self.history}

    def load_state_dict(self, saved: dict) -> None:
        self.best, self.epoch, self.bad = saved["best"], saved["epoch"], saved["bad"]
        self.state, self.history = saved["state"], saved["history"]


class BestStep:
    """Model selection for adapter fine-tuning (reranker, reasons): keeps the best-scoring validation step's
    state and stops after ``patience`` validations without improvement. Step 0 (before any update) counts."""

    def __init__(self, patience: int):
        self.patience = max(1, patience)
        self.score, self.step, self.bad, self.state = float("-inf"), 0, 0, None
        self.history: list[dict] = []

    def update(self, step: int, score: float, state, record: dict) -> bool:
        """Record a validation (``record``, with ``step`` added); keep ``state()`` (a callable, called only for a
        new best) when ``score`` beats every earlier one. Returns True when training should stop."""
        self.history.append({"step": step, **record})
        if score > self.score:
            self.score, self.step, self.bad, self.state = score, step, 0, state()
        else:
            self.bad += 1
        return self.bad >= self.patience
