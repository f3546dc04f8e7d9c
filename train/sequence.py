"""Training of the item-sequence user tower (``user.input: items``): next-item prediction at every position.

A user's training items are cut into windows of at most ``user.max_len + 1`` items (the most recent first);
window ``w + 1`` ends where window ``w`` starts, so every training target is predicted once, from up to
``max_len`` items of context. One causal pass over a window trains every position, as in SASRec. The state
after the last training item is scored against the validation item, the state after the validation item
against the test item (see :func:`data.protocol.held_out`).

The loss is a softmax over every training item (``train.loss: full``) or, for catalogs too large for that,
over the batch's positives plus uniform negatives with logQ correction (``sampled``).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from configs import Config
from data.protocol import Split, held_out, ranking_metrics, target_ranks
from towers.factory import TwoTower, trainable_state
from train.losses import inclusion_logq, info_nce

logger = logging.getLogger(__name__)


@dataclass
class Windows:
    """Training windows, right-padded: ``inputs (W, L)`` split item indices, ``mask (W, L)``, and ``targets
    (W, L)``: the next item at each position, ``-1`` where there is none to train on."""

    inputs: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.inputs)


def training_windows(split: Split, max_len: int) -> Windows:
    """Every user's training items as windows of ``max_len`` inputs, each training target predicted once."""
    rows_in, rows_t = [], []
    for u in range(split.num_users):
        train = split.train_seq(u)
        end = len(train)
        while end > 1:
            start = max(0, end - (max_len + 1))
            window = train[start:end]
            rows_in.append(window[:-1])
            rows_t.append(window[1:])
            end = start + 1
    return Windows(*_pad(rows_in, max_len), _pad(rows_t, max_len, fill=-1)[0])


def eval_sequences(split: Split, users: list[int], which: str, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(inputs, mask)`` of each user's history before the ``which`` target (last ``max_len``)."""
    return _pad([held_out(split, u, which)[1][-max_len:] for u in users], max_len)


def _pad(rows: list[np.ndarray], width: int, fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(np.asarray(r, dtype=np.int64))
        mask[i, : len(r)] = 1
    return out, mask


def sequence_user_embeddings(model: TwoTower, item_emb: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor,
                             batch_size: int = 256) -> torch.Tensor:
    """``(U, D)`` user embeddings after each history's last item; ``item_emb (I, D)`` gives the inputs."""
    out = []
    device = item_emb.device
    for start in range(0, len(inputs), batch_size):
        x, m = inputs[start:start + batch_size].to(device), mask[start:start + batch_size].to(device)
        out.append(model.user.encode_users(item_emb[x], m, x if model.user.table is not None else None))
    return torch.cat(out) if out else item_emb.new_zeros((0, item_emb.shape[1]))


@torch.no_grad()
def evaluate_sequences(model: TwoTower, split: Split, item_emb: torch.Tensor, which: str,
                       users: list[int] | None = None) -> dict[str, float]:
    """Full-ranking metrics over all split items for ``which`` in (valid, test), history excluded."""
    users = list(range(split.num_users)) if users is None else users
    inputs, mask = eval_sequences(split, users, which, model.config.user.max_len)
    u = sequence_user_embeddings(model, item_emb, inputs, mask)
    ranks = []
    for start in range(0, len(users), 512):
        idx = users[start:start + 512]
        held = [held_out(split, i, which) for i in idx]
        scores = (u[start:start + 512] @ item_emb.T).float().cpu()
        ranks.append(target_ranks(scores, torch.tensor([t for t, _, _ in held]), [ex for _, _, ex in held]))
    out = ranking_metrics(torch.cat(ranks))
    out["users"] = len(users)
    return out


def use_full_softmax(config: Config, num_items: int) -> bool:
    """``train.loss`` resolved: "auto" is a full softmax up to ``full_softmax_max_items`` items."""
    if config.train.loss == "auto":
        return num_items <= config.train.full_softmax_max_items
    return config.train.loss == "full"


class SequenceTrainer:
    """One optimizer, schedule and step function for the item-sequence user tower and the item tower."""

    def __init__(self, config: Config, model: TwoTower, bank, split: Split, device, windows: Windows):
        self.config, self.model, self.bank, self.split, self.device = config, model, bank, split, device
        self.windows = windows
        self.full = use_full_softmax(config, split.num_items)
        freq = torch.bincount(windows.targets[windows.targets >= 0], minlength=split.num_items).double()
        self.freq = (freq / freq.sum().clamp(min=1)).to(device)  # how often each item is a training target
        tc = config.train
        llm = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("user.llm.")]
        rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("user.llm.")]
        groups = [{"params": rest, "lr": tc.lr}]
        if llm:
            groups.append({"params": llm, "lr": tc.llm_lr or tc.lr})
        self.optim = torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay)
        steps_per_epoch = math.ceil(math.ceil(len(windows) / tc.batch_size) / tc.grad_accum)
        total = max(1, steps_per_epoch * tc.epochs)
        from transformers import get_cosine_schedule_with_warmup

        self.scheduler = get_cosine_schedule_with_warmup(self.optim, int(tc.warmup * total), total)
        self.autocast = device.type == "cuda"  # bf16 on CUDA; fp32 on CPU, where bf16 matmuls are slow
        self.step = 0

    def loss(self, idx: torch.Tensor) -> torch.Tensor:
        """Mean next-item loss over the real positions of windows ``idx``."""
        cfg, model, dev = self.config, self.model, self.device
        inputs, mask, targets = (t[idx].to(dev) for t in (self.windows.inputs, self.windows.mask, self.windows.targets))
        keep = targets >= 0
        t = targets[keep]  # (N,)
        if self.full:
            needed = None  # every training item is a candidate
        else:
            uniform = torch.randint(0, self.split.num_items, (cfg.train.num_negatives,), device=dev)
            needed = torch.unique(torch.cat([inputs[mask.bool()], t, uniform]))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            emb = self.bank.encode(model, needed, dropout=cfg.item.modality_dropout)  # (M, D)
            if needed is None:
                pos_of = None
                x = emb[inputs]
            else:
                pos_of = torch.full((self.split.num_items,), -1, dtype=torch.long, device=dev)
                pos_of[needed] = torch.arange(len(needed), device=dev)
                x = emb[pos_of[inputs]]
            states = model.user.encode_sequence(x, mask, inputs if model.user.table is not None else None)
            u = states[keep]  # (N, D)
        if needed is None:
            return info_nce(u.float(), emb.float(), t, model.logit_scale)
        cand = torch.unique(torch.cat([t, uniform]))  # positives of the batch plus uniform negatives
        logq = inclusion_logq(self.freq[cand], len(t), cfg.train.num_negatives, self.split.num_items)
        target_in_cand = torch.searchsorted(cand, t)
        return info_nce(u.float(), emb[pos_of[cand]].float(), target_in_cand, model.logit_scale, logq=logq.float())

    def epoch(self, order: list[int], desc: str = "", progress: bool = True) -> float:
        """One pass over the windows in ``order``; returns the mean loss."""
        tc = self.config.train
        self.model.train()
        if self.config.user.strategy == "frozen":
            self.model.user.llm.eval()  # no dropout inside a frozen LLM
        losses = []
        batches = range(0, len(order), tc.batch_size)
        self.optim.zero_grad(set_to_none=True)
        for k, start in enumerate(tqdm(batches, desc=desc, leave=False, disable=not progress)):
            loss = self.loss(torch.as_tensor(order[start:start + tc.batch_size]))
            (loss / tc.grad_accum).backward()
            losses.append(loss.item())
            if (k + 1) % tc.grad_accum == 0 or k == len(batches) - 1:
                self.optim.step()
                self.scheduler.step()
                self.optim.zero_grad(set_to_none=True)
                self.step += 1
        return float(np.mean(losses)) if losses else float("nan")


def fit_sequence(config: Config, model: TwoTower, bank, split: Split, device,
                 progress: bool = True) -> tuple[int, list[dict]]:
    """Train with early stopping on validation NDCG@10; the model ends with its best epoch's weights."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    windows = training_windows(split, config.user.max_len)
    trainer = SequenceTrainer(config, model, bank, split, device, windows)
    logger.info("%d training windows, %s softmax", len(windows), "full" if trainer.full else "sampled")
    rng = random.Random(config.train.seed)
    eval_users = list(range(split.num_users))
    if config.train.eval_users and config.train.eval_users < len(eval_users):
        eval_users = sorted(rng.sample(eval_users, config.train.eval_users))
    history: list[dict] = []
    best, best_epoch, bad, best_state = -1.0, -1, 0, None
    for epoch in range(config.train.epochs):
        order = list(range(len(windows)))
        rng.shuffle(order)
        loss = trainer.epoch(order, f"epoch {epoch}", progress)
        model.eval()
        with torch.no_grad():
            valid = evaluate_sequences(model, split, bank.encode(model), "valid", eval_users)
        record = {"epoch": epoch, "loss": loss, "lr": trainer.scheduler.get_last_lr()[0],
                  "temperature": float(1 / model.logit_scale.detach().exp().clamp(max=100)), **valid}
        history.append(record)
        logger.info("epoch %d loss %.4f valid recall@10 %.4f ndcg@10 %.4f", epoch, loss,
                    valid["recall@10"], valid["ndcg@10"])
        if valid["ndcg@10"] > best:
            best, best_epoch, bad = valid["ndcg@10"], epoch, 0
            best_state = trainable_state(model)
        else:
            bad += 1
            if bad >= config.train.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    model.eval()
    return best_epoch, history
