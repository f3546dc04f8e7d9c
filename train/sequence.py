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
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from configs import Config
from data.atomic import write_file
from data.protocol import (
    COLD_SHARE_AT,
    Split,
    held_out,
    protocol_metrics,
    ranking_metrics,
    target_ranks,
    top_items,
)
from towers.factory import TwoTower, trainable_state
from towers.progress import tqdm
from train.losses import inclusion_logq, info_nce
from train.selection import BestEpoch

logger = logging.getLogger(__name__)


@dataclass
class Windows:
    """Training windows, right-padded: ``inputs (W, L)`` split item indices, ``mask (W, L)``, and ``targets
    (W, L)``: the next item at each position, ``-1`` where there is none to train on. ``users (W,)`` and
    ``starts (W,)`` say where each window begins in its user's training items (what is older than it);
    ``prefix (W, H')`` holds their older histories' profile states under ``user.profile_prefix``."""

    inputs: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor
    users: torch.Tensor
    starts: torch.Tensor
    prefix: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.inputs)


def training_windows(split: Split, max_len: int, through_valid: bool = False) -> Windows:
    """Every user's training items as windows of ``max_len`` inputs, each training target predicted once.

    ``through_valid``: each user's validation item is a training item too (the refit, see :func:`fit_sequence`).
    """
    rows_in, rows_t, users, starts = [], [], [], []
    for u in range(split.num_users):
        train = split.train_seq(u, through_valid)
        end = len(train)
        while end > 1:
            start = max(0, end - (max_len + 1))
            window = train[start:end]
            rows_in.append(window[:-1])
            rows_t.append(window[1:])
            users.append(u)
            starts.append(start)
            end = start + 1
    return Windows(*_pad(rows_in, max_len), _pad(rows_t, max_len, fill=-1)[0], torch.tensor(users),
                   torch.tensor(starts))


def older_histories(split: Split, windows: Windows) -> list[np.ndarray]:
    """Each window's older history: its user's training items before the window's first input."""
    return [split.train_seq(int(u))[: int(s)] for u, s in zip(windows.users, windows.starts)]


def prefix_profiles(model: TwoTower, config: Config, split_items):
    """The :class:`towers.sequence.ProfilePrefixes` of a model with ``user.profile_prefix`` over split items
    (``split_items``: their catalog rows, in split order); None without a prefix."""
    if model.user.profile is None:
        return None
    from data.profiles import profile_builder
    from towers.hub import load_tokenizer
    from towers.sequence import ProfilePrefixes

    tokenizer = load_tokenizer(config.user.model)
    return ProfilePrefixes(model, profile_builder(config, split_items, tokenizer), tokenizer.pad_token_id,
                           config.user.batch_size)


def eval_sequences(split: Split, users: list[int], which: str, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(inputs, mask)`` of each user's history before the ``which`` target (last ``max_len``)."""
    return _pad([held_out(split, u, which)[1][-max_len:] for u in users], max_len)


def eval_older(split: Split, users: list[int], which: str, max_len: int) -> list[np.ndarray]:
    """What :func:`eval_sequences` leaves out: each history before the ``which`` target but its last ``max_len``."""
    return [held_out(split, u, which)[1][:-max_len] for u in users]


def _pad(rows: list[np.ndarray], width: int, fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(np.asarray(r, dtype=np.int64))
        mask[i, : len(r)] = 1
    return out, mask


def sequence_user_embeddings(model: TwoTower, item_emb: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor,
                             batch_size: int = 256, titles: torch.Tensor | None = None,
                             prefix: torch.Tensor | None = None) -> torch.Tensor:
    """``(U, D)`` user embeddings after each history's last item; ``item_emb (I, D)`` gives the inputs,
    ``titles (I, H)`` (``user.item_titles``) their title embeddings and ``prefix (U, H')`` the older histories'
    profile states (``user.profile_prefix``).

    Histories are batched by length (longest first), and each batch is cut to its own longest history, so
    short histories do not pay for long ones; the rows come back in the order given."""
    device = item_emb.device
    lengths = mask.sum(1)
    order = torch.argsort(lengths, descending=True, stable=True)
    out = item_emb.new_zeros((len(inputs), item_emb.shape[1]))
    for start in range(0, len(inputs), batch_size):
        rows = order[start:start + batch_size]
        width = max(1, int(lengths[rows].max()))
        x, m = inputs[rows, :width].to(device), mask[rows, :width].to(device)
        p = None if prefix is None else prefix[rows.to(prefix.device)]
        out[rows.to(device)] = model.user.encode_users(item_emb[x], m, x if model.user.table is not None else None,
                                                       None if titles is None else titles[x], p).to(out.dtype)
    return out


@torch.no_grad()
def evaluate_sequences(model: TwoTower, split: Split, item_emb: torch.Tensor, which: str,
                       users: list[int] | None = None, titles: torch.Tensor | None = None,
                       prefixes=None) -> dict[str, float]:
    """Full-ranking metrics over all split items for ``which`` in (valid, test), history excluded.

    ``prefixes``: the :func:`prefix_profiles` of a model with ``user.profile_prefix``."""
    users = list(range(split.num_cases(which))) if users is None else users
    max_len = model.config.user.max_len
    inputs, mask = eval_sequences(split, users, which, max_len)
    prefix = None if prefixes is None else prefixes(eval_older(split, users, which, max_len))
    u = sequence_user_embeddings(model, item_emb, inputs, mask, titles=titles, prefix=prefix)
    ranks, tops = [], []
    for start in range(0, len(users), 512):
        idx = users[start:start + 512]
        held = [held_out(split, i, which) for i in idx]
        scores = (u[start:start + 512] @ item_emb.T).float().cpu()
        ranks.append(target_ranks(scores, torch.tensor([t for t, _, _ in held]), [ex for _, _, ex in held]))
        if split.protocol == "cold-items":
            tops.append(top_items(scores, [ex for _, _, ex in held], COLD_SHARE_AT))
    if len(users) < split.num_cases(which):  # a sample: the per-protocol extras need every case
        out = ranking_metrics(torch.cat(ranks))
        out["users"] = len(users)
        return out
    return protocol_metrics(split, which, torch.cat(ranks), torch.cat(tops) if tops else None)


def use_full_softmax(config: Config, num_items: int) -> bool:
    """``train.loss`` resolved: "auto" is a full softmax up to ``full_softmax_max_items`` items."""
    if config.train.loss == "auto":
        return num_items <= config.train.full_softmax_max_items
    return config.train.loss == "full"


class NextItemLoss(nn.Module):
    """The whole training objective as one module, so torch DDP can wrap it.

    ``forward(inputs, mask, targets, uniform)`` returns this process's share of the global batch's mean loss:
    the sum over its positions times ``world_size / N`` (``N`` positions in the global batch), so DDP's
    gradient averaging gives exactly the gradient of the global mean. Under DDP the candidates of a sampled
    softmax are the positives of the *global* batch (their ids are all-gathered) plus ``uniform`` negatives,
    which every process draws alike; each process embeds the candidates it scores.
    """

    def __init__(self, model: TwoTower, bank, num_items: int, full: bool, freq: torch.Tensor,
                 modality_dropout: float, autocast: bool, titles: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        self.titles = titles  # (I, H) title embeddings (user.item_titles), fixed
        self.bank = bank  # not a module: the item tower inside ``model`` encodes its inputs
        self.num_items, self.full, self.freq = num_items, full, freq
        self.modality_dropout, self.autocast = modality_dropout, autocast

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor,
                uniform: torch.Tensor | None = None, prefix: torch.Tensor | None = None) -> torch.Tensor:
        model, dev = self.model, inputs.device
        keep = targets >= 0
        t = targets[keep]  # (n,) this process's positives
        t_all, world = all_gather_ids(t)  # (N,) the global batch's positives
        # Full softmax: every item training may see (items 0 .. num_items - 1; new items of cold-items are not).
        needed = torch.unique(torch.cat([inputs[mask.bool()], t_all, uniform])) if not self.full else (
            None if self.num_items == self.bank.size else torch.arange(self.num_items, device=dev))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            emb = self.bank.encode(model, needed, dropout=self.modality_dropout)  # (M, D)
            pos_of = None
            if not self.full:
                pos_of = torch.full((self.num_items,), -1, dtype=torch.long, device=dev)
                pos_of[needed] = torch.arange(len(needed), device=dev)
            x = emb[inputs] if pos_of is None else emb[pos_of[inputs]]  # (B, T, D)
            states = model.user.encode_sequence(x, mask, inputs if model.user.table is not None else None,
                                                None if self.titles is None else self.titles[inputs], prefix)
            u = states[keep].float()  # (n, D)
        scale = world / max(1, len(t_all))
        if self.full:  # full softmax: every training item is a candidate
            return info_nce(u, emb.float(), t, model.logit_scale, reduction="sum") * scale
        cand = torch.unique(torch.cat([t_all, uniform]))  # sorted: positives of the global batch + negatives
        logq = inclusion_logq(self.freq[cand], len(t_all), len(uniform), self.num_items).float()
        return info_nce(u, emb[pos_of[cand]].float(), torch.searchsorted(cand, t), model.logit_scale,
                        logq=logq, reduction="sum") * scale


def all_gather_ids(ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(ids of every process, world size)``; just ``(ids, 1)`` outside ``torch.distributed``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ids, 1
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=ids.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(ids)], device=ids.device))
    width = int(max(s.item() for s in sizes))
    padded = torch.full((width,), -1, dtype=ids.dtype, device=ids.device)
    padded[: len(ids)] = ids
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(n.item())] for o, n in zip(out, sizes)]), world


THIN_COUNT, THIN_SHARE = 5, 0.10  # train.refit "auto": refit where >= 10% of validation targets have < 5


def refit_wanted(setting: bool | str, split: Split) -> bool:
    """``train.refit`` resolved: "auto" refits where the newest items are thin in training, i.e. at least
    :data:`THIN_SHARE` of the validation targets have fewer than :data:`THIN_COUNT` training interactions.
    Those are the catalogs where each user's validation item adds most: the test targets are newer still."""
    if setting != "auto":
        return bool(setting)
    counts = np.zeros(split.num_items, dtype=np.int64)
    for u in range(split.num_users):
        np.add.at(counts, split.train_seq(u), 1)
    # The validation items the refit would add: those of users and items training sees (all of them, warm).
    added = [split.valid_target(u) for u in range(split.num_users) if u not in split.cold_users]
    thin = float(np.mean([counts[t] < THIN_COUNT for t in added if t < split.num_train_items]))
    wanted = thin >= THIN_SHARE
    logger.info("%.1f%% of validation targets have fewer than %d training interactions: train.refit auto -> %s",
                100 * thin, THIN_COUNT, wanted)
    return wanted


AUTO_BUCKETS = 20  # pools of batches that train.length_buckets "auto" sorts by length


def length_buckets(setting: int | str, windows: Windows) -> int:
    """``train.length_buckets`` resolved for these windows: "auto" buckets (:data:`AUTO_BUCKETS`) only where
    plain batches would be mostly padding, i.e. the windows' mean length is under half the longest."""
    if setting != "auto":
        return int(setting)
    lengths = windows.mask.sum(1).double()
    if len(lengths) == 0 or lengths.mean() >= 0.5 * lengths.max():
        return 0
    return AUTO_BUCKETS


class SequenceTrainer:
    """Optimizer, schedule, step function and resumable state for the item-sequence user tower."""

    def __init__(self, config: Config, model: TwoTower, bank, split: Split, device, windows: Windows,
                 titles: torch.Tensor | None = None):
        self.config, self.model, self.bank, self.split, self.device = config, model, bank, split, device
        self.windows = windows
        self.buckets = length_buckets(config.train.length_buckets, windows)
        self.lengths = windows.mask.sum(1).tolist()  # each window's length, for the length buckets
        if config.train.length_buckets == "auto" and self.buckets:
            logger.info("short histories (mean window %.1f of up to %d items): batches of similar length "
                        "(train.length_buckets auto -> %d)", float(np.mean(self.lengths)), max(self.lengths),
                        self.buckets)
        self.full = use_full_softmax(config, split.num_train_items)
        freq = torch.bincount(windows.targets[windows.targets >= 0], minlength=split.num_train_items).double()
        freq = (freq / freq.sum().clamp(min=1)).to(device)  # how often each item is a training target
        tc = config.train
        self.objective = NextItemLoss(model, bank, split.num_train_items, self.full, freq, config.item.modality_dropout,
                                      autocast=device.type == "cuda", titles=titles)  # bf16 on CUDA only
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.step_fn = self.objective
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # Modality dropout is drawn per process, so a step may leave an encoder unused on one process only.
            self.step_fn = DistributedDataParallel(self.objective, find_unused_parameters=True,
                                                   device_ids=[device.index] if device.type == "cuda" else None)
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
        self.step = 0
        # Everything random in training draws from these, so a resumed run continues the same trajectory.
        self.rng = random.Random(config.train.seed)  # window order
        self.gen = torch.Generator().manual_seed(config.train.seed)  # uniform negatives (alike on every process)

    def loss(self, idx: torch.Tensor) -> torch.Tensor:
        """This process's share of the loss of the global batch of windows ``idx`` (its slice ``rank::world``)."""
        idx = idx[self.rank::self.world]
        width = max(1, int(self.windows.mask[idx].sum(1).max()))  # pad to the batch's longest window only
        inputs, mask, targets = (t[idx, :width].to(self.device) for t in
                                 (self.windows.inputs, self.windows.mask, self.windows.targets))
        uniform = None
        if not self.full:
            uniform = torch.randint(0, self.split.num_train_items, (self.config.train.num_negatives,),
                                    generator=self.gen).to(self.device)
        prefix = None if self.windows.prefix is None else self.windows.prefix[idx].to(self.device)
        return self.step_fn(inputs, mask, targets, uniform, prefix)

    def batches(self) -> list[list[int]]:
        """This epoch's global batches of window indices: a fresh random order, or with B length buckets
        (``train.length_buckets``, resolved by :func:`length_buckets`), windows of similar length together
        (sorted within random pools of B batches, then the batches shuffled), which cuts the padding of
        catalogs with short histories."""
        tc = self.config.train
        order = list(range(len(self.windows)))
        self.rng.shuffle(order)
        if self.buckets:
            pool = self.buckets * tc.batch_size
            order = [i for s in range(0, len(order), pool)
                     for i in sorted(order[s:s + pool], key=lambda w: -self.lengths[w])]
        batches = [order[s:s + tc.batch_size] for s in range(0, len(order), tc.batch_size)]
        if self.buckets:
            self.rng.shuffle(batches)
        return batches

    def epoch(self, desc: str = "", progress: bool = True) -> float:
        """One pass over the windows (see :meth:`batches`); returns the mean loss."""
        tc = self.config.train
        self.model.train()
        if self.config.user.strategy == "frozen":
            self.model.user.llm.eval()  # no dropout inside a frozen LLM
        losses = []
        batches = self.batches()
        self.optim.zero_grad(set_to_none=True)
        for k, batch in enumerate(tqdm(batches, desc=desc, leave=False, disable=not progress or self.rank > 0)):
            loss = self.loss(torch.as_tensor(batch))
            (loss / tc.grad_accum).backward()
            losses.append(loss.item() / self.world)
            if (k + 1) % tc.grad_accum == 0 or k == len(batches) - 1:
                self.optim.step()
                self.scheduler.step()
                self.optim.zero_grad(set_to_none=True)
                self.step += 1
        return float(np.sum(losses) / len(losses) * self.world) if losses else float("nan")

    def state_dict(self) -> dict:
        """Model, optimizer, scheduler, RNGs and step: what a resumed run needs to continue the same trajectory."""
        return {"model": trainable_state(self.model), "optim": self.optim.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step, "rng": self.rng.getstate(),
                "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy_rng": np.random.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"], strict=False)
        self.optim.load_state_dict(state["optim"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.rng.setstate(state["rng"])
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        np.random.set_state(state["numpy_rng"])


def fit_sequence(config: Config, model: TwoTower, bank, split: Split, device, progress: bool = True,
                 resume_path: Path | None = None, titles: torch.Tensor | None = None,
                 prefixes=None, refit_epochs: int = 0) -> tuple[int, list[dict]]:
    """Train with early stopping on validation NDCG@10; the model ends with its best epoch's weights.

    ``prefixes``: the :func:`prefix_profiles` of a model with ``user.profile_prefix`` (required then).

    With ``resume_path``, the whole training state is saved there after every epoch (atomically), and
    training continues from it when it exists.

    ``refit_epochs=n`` is the refit (``train.refit``): the same recipe on a model freshly initialised from the
    same seed, for the ``n`` epochs validation chose, on windows that also hold each user's validation item,
    with no selection (there is nothing left to validate on). The newest interactions are the ones sparse
    catalogs lack most.
    """
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    windows = training_windows(split, config.user.max_len, through_valid=refit_epochs > 0)
    if prefixes is not None:  # the frozen LLM reads every window's older history once
        windows.prefix = prefixes(older_histories(split, windows)).cpu()
        logger.info("prefix profiles of %d older histories", len(prefixes.cache))
    if config.user.init == "pretrained" and not model.user.calibrated:  # not when continuing a trained run
        if windows.prefix is not None:
            model.user.calibrate_prefix(windows.prefix)
        calibrate_states(model, bank, windows, device, config.train.seed, titles)
    trainer = SequenceTrainer(config, model, bank, split, device, windows, titles)
    logger.info("%d training windows, %s softmax, %d process(es)", len(windows),
                "full" if trainer.full else "sampled", trainer.world)
    if refit_epochs:
        history = []
        for epoch in range(refit_epochs):
            history.append({"epoch": epoch, "loss": trainer.epoch(f"refit {epoch}", progress),
                            "lr": trainer.scheduler.get_last_lr()[0]})
            logger.info("refit epoch %d loss %.4f", epoch, history[-1]["loss"])
        model.eval()
        return refit_epochs - 1, history
    eval_users = list(range(split.num_cases("valid")))
    if config.train.eval_users and config.train.eval_users < len(eval_users):
        eval_users = sorted(random.Random(config.train.seed).sample(eval_users, config.train.eval_users))
    best = BestEpoch(config.train.patience)
    if resume_path is not None and resume_path.is_file():
        saved = torch.load(resume_path, map_location=device, weights_only=False)
        trainer.load_state_dict(saved["trainer"])
        best.load_state_dict(saved["selection"])
        logger.info("resumed from %s after epoch %d", resume_path, len(best.history) - 1)
    for epoch in range(len(best.history), 0 if best.stopped else config.train.epochs):
        loss = trainer.epoch(f"epoch {epoch}", progress)
        model.eval()
        with torch.no_grad():
            valid = evaluate_sequences(model, split, bank.encode(model), "valid", eval_users, titles, prefixes)
        stop = best.update(model, epoch, loss, valid, lr=trainer.scheduler.get_last_lr()[0])
        if resume_path is not None and trainer.rank == 0:
            save_resume_state(resume_path, {"trainer": trainer.state_dict(), "selection": best.state_dict()})
        if stop:
            break
    best.restore(model)
    return best.epoch, best.history


def calibrate_states(model: TwoTower, bank, windows: Windows, device, seed: int,
                     titles: torch.Tensor | None = None, sample: int = 64) -> None:
    """Standardise the untrained LLM's states (see ``ItemSequenceUserTower.calibrate``) over a seeded sample of
    training windows: the same sample, hence the same statistics, on every process."""
    model.eval()
    with torch.no_grad():
        item_emb = bank.encode(model)
        pick = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))[:sample]
        x, m = windows.inputs[pick].to(device), windows.mask[pick].to(device)
        model.user.calibrate(item_emb[x], m, x if model.user.table is not None else None,
                             None if titles is None else titles[x],
                             None if windows.prefix is None else windows.prefix[pick].to(device))


def save_resume_state(path: Path, state: dict) -> None:
    """``torch.save`` atomically (:func:`data.atomic.write_file`): an interrupted save never corrupts the last
    state."""
    write_file(path, lambda tmp: torch.save(state, tmp))
