"""The training loop: contrastive fine-tuning of both towers, validation each epoch, best checkpoint kept.

One LLM pass per user covers every position: the profile prompt lists the user's items oldest first
(``seq[:-1]``: training items plus the validation item) and the causal LLM's state at the end of item ``p``
sees only items ``<= p``. The state after item ``p`` is trained to retrieve item ``p + 1`` (training targets
only), the state after the last training item is scored against the validation item, and the state after
the validation item against the test item. When the LLM is frozen those states are computed once and
cached; otherwise they are recomputed with gradients each step.
"""

from __future__ import annotations

import logging
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from configs import Config
from data.catalog import Catalog, load_catalog
from data.ids import ItemSpace
from data.items import collate_items, pad_batch, to_device
from data.profiles import ProfileBuilder, profile_builder
from data.protocol import Split, held_out, ranking_metrics, split_catalog, target_ranks
from data.rundir import RunDir
from data.tombstones import Tombstones
from errors import CatalogError, CheckpointError, ConfigError
from towers.device import resolve_device
from towers.factory import TwoTower, build_towers, is_saved, load_towers, make_item_dataset, save_towers
from towers.hub import load_tokenizer
from towers.progress import tqdm
from towers.sequence import title_table
from train.curves import plot_curves
from train.distributed import init_distributed
from train.features import frozen_features
from train.losses import info_nce
from train.selection import BestEpoch
from train.sequence import evaluate_sequences, fit_sequence, prefix_profiles, refit_wanted

logger = logging.getLogger(__name__)

SCORE_BATCH = 256  # users per full-ranking scoring pass in evaluation


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Prompt:
    """One profile prompt of one user: its token ids, the positions to read and what each one predicts.

    A user's first prompt covers ``seq[:-1]`` (training items plus the validation item): its last two
    positions are the validation and test positions. Further prompts cover earlier stretches of the training
    history and carry training positions only.
    """

    user: int
    input_ids: list[int]
    train_pos: list[int]  # positions whose next item is a training item
    train_targets: list[int]  # split item index of that next item
    valid_pos: int | None = None  # after the last training item (predicts the validation item)
    test_pos: int | None = None  # after the validation item (predicts the test item)

    @property
    def read_positions(self) -> list[int]:
        return self.train_pos + [p for p in (self.valid_pos, self.test_pos) if p is not None]


def user_prompts(split: Split, split_rows: np.ndarray, builder: ProfileBuilder, max_positions: int,
                 windows: int = 1) -> list[Prompt]:
    """Prompts for every split user; prompt ``u`` is user ``u``'s main prompt, extra windows follow.

    Window ``w + 1`` ends where window ``w`` starts, so each training target is predicted once, and a
    position never sees its own target or anything after it. ``max_positions`` keeps the most recent
    training positions of each prompt (0 = all).
    """
    main, extra = [], []
    for u in range(split.num_users):
        seq = split.sequences[u]
        last_train = len(seq) - 3  # index of the last training item
        end = len(seq) - 1
        for w in range(windows):
            prof = builder.build(split_rows[seq[:end]])
            first = end - len(prof.ends)  # sequence index of the first kept item
            if w == 0 and len(prof.ends) < 2:
                raise CatalogError(f"user {split.user_ids[u]!r}: the profile budget keeps only {len(prof.ends)} "
                                 "item(s); raise data.profile_token_budget")
            pairs = [(p, int(seq[first + i + 1])) for i, p in enumerate(prof.ends) if first + i + 1 <= last_train]
            if max_positions:
                pairs = pairs[-max_positions:]
            prompt = Prompt(u, prof.input_ids, [p for p, _ in pairs], [t for _, t in pairs])
            if w == 0:
                prompt.valid_pos, prompt.test_pos = prof.ends[-2], prof.ends[-1]
                main.append(prompt)
            elif pairs:
                extra.append(prompt)
            end = first
            if end < 2:
                break
    return main + extra


class UserStates:
    """Pooled LLM states at every prompt's read positions (training positions, then valid, then test).

    For a frozen LLM they are computed once and cached; otherwise they are recomputed, with gradients, each
    time they are asked for.
    """

    def __init__(self, model: TwoTower, prompts: list[Prompt], device, pad_id: int, content_start: int,
                 batch_size: int, progress: bool = True):
        self.model, self.prompts, self.device = model, prompts, device
        self.pad_id, self.content_start = pad_id, content_start
        self.cache: list[torch.Tensor] | None = None
        if model.config.user.strategy == "frozen":
            model.user.llm.eval()
            cache: list[torch.Tensor] = []
            with torch.inference_mode():
                for start in tqdm(range(0, len(prompts), batch_size), desc="user LLM states", leave=False,
                                  disable=not progress):
                    cache.extend(s.float().cpu() for s in self._compute(range(start, min(start + batch_size, len(prompts)))))
            self.cache = cache

    def _compute(self, idx) -> list[torch.Tensor]:
        idx = list(idx)
        ids, mask = pad_batch([self.prompts[i].input_ids for i in idx], self.pad_id)
        keep = [self.prompts[i].read_positions for i in idx]
        width = max(len(k) for k in keep)
        positions = torch.tensor([k + [k[-1]] * (width - len(k)) for k in keep], dtype=torch.long)
        s = self.model.user.states(ids.to(self.device), mask.to(self.device), positions.to(self.device),
                                   self.content_start)  # (B, P, H)
        return [s[j, : len(k)] for j, k in enumerate(keep)]

    def get(self, idx: list[int], which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """States ``(N, H)`` and split targets ``(N,)`` (``which``: train / valid / test) for prompts ``idx``."""
        rows = [self.cache[i] for i in idx] if self.cache is not None else self._compute(idx)
        states, targets = [], []
        for i, r in zip(idx, rows):
            n = len(self.prompts[i].train_pos)
            states.append({"train": r[:n], "valid": r[n:n + 1], "test": r[n + 1:n + 2]}[which])
            if which == "train":
                targets.extend(self.prompts[i].train_targets)
        return torch.cat(states).to(self.device), torch.tensor(targets, dtype=torch.long)


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    valid: dict[str, float]
    test: dict[str, float]
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    refit: dict | None = None  # train.refit: {epochs, seconds, history} of the refit that the test scored
    transfer: dict | None = None  # --init-from: {from: the source run, zero_shot}


class ItemBank:
    """Collated inputs of every training item, built once; frozen encoders' features replace their inputs."""

    def __init__(self, dataset, split_rows: np.ndarray, frozen: dict[str, torch.Tensor], device, chunk: int = 512):
        """``frozen`` holds frozen encoders' features of the training items, in split order."""
        pad = dataset.tokenizer.pad_token_id if dataset.tokenizer is not None else 0
        # cached features (and the image mask) replace the raw inputs of frozen encoders: those are not decoded
        dataset = dataset.without(*[m for m in ("text", "image") if f"{m}_features" in frozen])
        batch = collate_items([dataset[int(r)] for r in split_rows], pad, dataset.cfg.image.image_size)
        batch.update(frozen)
        batch.pop("row")
        self.inputs = to_device(batch, device)
        self.size, self.chunk = len(split_rows), chunk

    def encode(self, model: TwoTower, items: torch.Tensor | None = None, dropout: float = 0.0) -> torch.Tensor:
        """``(N, D)`` embeddings of training items ``items`` (split indices; default all), in chunks."""
        items = torch.arange(self.size) if items is None else items.cpu()
        out = []
        for start in range(0, len(items), self.chunk):
            idx = items[start:start + self.chunk].to(next(iter(self.inputs.values())).device)
            batch = {k: v.index_select(0, idx) for k, v in self.inputs.items()}
            out.append(model.item.encode_items(batch, modality_dropout=dropout))
        return torch.cat(out)


def evaluate_positions(model: TwoTower, states: UserStates, split: Split, item_emb: torch.Tensor, which: str,
                       users: list[int] | None = None) -> dict[str, float]:
    """Full-ranking metrics over all split items for ``which`` in (valid, test), history excluded."""
    users = list(range(split.num_users)) if users is None else users
    ranks = []
    with torch.no_grad():
        for start in range(0, len(users), SCORE_BATCH):
            idx = users[start:start + SCORE_BATCH]
            s, _ = states.get(idx, which)
            u = model.user.head(s)
            scores = (u @ item_emb.T).cpu()
            held = [held_out(split, i, which) for i in idx]
            targets = torch.tensor([t for t, _, _ in held])
            ranks.append(target_ranks(scores, targets, [ex for _, _, ex in held]))
    out = ranking_metrics(torch.cat(ranks))
    out["users"] = len(users)
    return out


@dataclass
class TrainingData:
    """The catalog, its split, and the maps between the item spaces training uses."""

    catalog: Catalog
    split: Split
    catalog_items: ItemSpace  # catalog rows
    split_items: ItemSpace  # dense split indices
    id_items: ItemSpace  # rows of the item tower's id table: the split items training sees (all, warm)
    split_rows: np.ndarray  # (I,) split index -> catalog row
    id_rows: np.ndarray  # (N,) catalog row -> id-table row, -1 for items outside the split or new (cold-items)
    erased: Tombstones = field(default_factory=Tombstones)  # users dropped (the catalog's list, a source run's)


def load_training_data(config: Config, catalog_dir: str | Path, erased: Tombstones | None = None) -> TrainingData:
    """Step 1: load and validate the catalog (without the users erased from it or in ``erased``), and split it by
    the leave-one-out protocol."""
    erased = Tombstones.of(catalog_dir).update(erased or Tombstones())
    catalog = load_catalog(catalog_dir, erased)
    split = split_catalog(config, catalog)
    catalog_items = ItemSpace(catalog.items["item_id"].to_list(), "catalog")
    split_items = ItemSpace(split.item_ids, "split")
    id_items = ItemSpace(split.item_ids[:split.num_train_items], "id table")  # new items last: see Split
    return TrainingData(catalog, split, catalog_items, split_items, id_items,
                        split_rows=split_items.to(catalog_items), id_rows=catalog_items.to(id_items), erased=erased)


def build_item_bank(config: Config, model: TwoTower, data: TrainingData, device, progress: bool) -> ItemBank:
    """Step 3: the training items' inputs, with frozen encoders' features computed once."""
    dataset = make_item_dataset(data.catalog, model, data.id_rows)
    frozen = frozen_features(model, dataset, device, config.item.text.batch_size, rows=data.split_rows,
                             progress=progress)
    return ItemBank(dataset, data.split_rows, frozen, device)


def build_user_states(config: Config, model: TwoTower, data: TrainingData, device, progress: bool) -> UserStates:
    """Step 4: every user's profile prompts, and (for a frozen LLM) their cached states."""
    tokenizer = load_tokenizer(config.user.model)
    builder = profile_builder(config, data.catalog.items, tokenizer)
    prompts = user_prompts(data.split, data.split_rows, builder, config.train.max_positions, config.train.windows)
    return UserStates(model, prompts, device, tokenizer.pad_token_id, len(builder.header_ids),
                      config.user.batch_size, progress)


def train_epoch(config: Config, model: TwoTower, states: UserStates, bank: ItemBank, optim: torch.optim.Optimizer,
                order: list[int], device, desc: str = "", progress: bool = True) -> float:
    """One pass over the prompts in ``order``; returns the mean loss."""
    model.train()
    if config.user.strategy == "frozen":
        model.user.llm.eval()
    prompts_per_step = max(1, config.train.batch_size // max(1, config.train.max_positions))
    losses = []
    for start in tqdm(range(0, len(order), prompts_per_step), desc=desc, leave=False, disable=not progress):
        idx = order[start:start + prompts_per_step]
        s, targets = states.get(idx, "train")
        u = model.user.head(s)  # (N, D)
        if config.train.negatives == "catalog":  # every training item is a candidate: full softmax
            v = bank.encode(model, dropout=config.item.modality_dropout)  # (I, D)
            loss = info_nce(u, v, targets.to(device), model.logit_scale)
        else:  # in-batch negatives: the unique positives of the batch
            uniq, inverse = torch.unique(targets, return_inverse=True)
            v = bank.encode(model, uniq, dropout=config.item.modality_dropout)  # (M, D)
            loss = info_nce(u, v, inverse.to(device), model.logit_scale)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        losses.append(loss.item())
    return float(np.mean(losses)) if losses else float("nan")


def fit(config: Config, model: TwoTower, states: UserStates, bank: ItemBank, split: Split, device,
        progress: bool = True) -> tuple[int, list[dict]]:
    """Step 5: train with early stopping on validation NDCG@10; the model ends with its best epoch's weights.

    Returns ``(best_epoch, history)``; each history record has the epoch's loss, temperature and validation
    metrics.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=config.train.lr, weight_decay=config.train.weight_decay)
    trainable_prompts = [i for i, p in enumerate(states.prompts) if p.train_pos]
    rng = random.Random(config.train.seed)
    eval_users = list(range(split.num_users))
    if config.train.eval_users and config.train.eval_users < len(eval_users):
        eval_users = sorted(rng.sample(eval_users, config.train.eval_users))

    best = BestEpoch(config.train.patience)
    for epoch in range(config.train.epochs):
        order = trainable_prompts[:]
        rng.shuffle(order)
        loss = train_epoch(config, model, states, bank, optim, order, device, f"epoch {epoch}", progress)
        model.eval()
        with torch.no_grad():
            valid = evaluate_positions(model, states, split, bank.encode(model), "valid", eval_users)
        if best.update(model, epoch, loss, valid):
            break
    best.restore(model)
    return best.epoch, best.history


def train(config: Config, catalog_dir: str | Path, run_dir: str | Path, progress: bool = True,
          overwrite: bool = False, resume: bool = False, resume_from: str | Path | None = None,
          init_from: str | Path | None = None, zero_shot: bool = False) -> TrainResult:
    """Train both towers on a catalog and write a servable run directory.

    Args:
        config: the full setup (see ``configs/``).
        catalog_dir: a folder written by ``towerrec prepare``.
        run_dir: output folder (see :class:`data.rundir.RunDir`). It is written in a staging folder and
            published whole when training ends, so an interrupted run leaves nothing half-written; the staging
            folders of killed trainings on this path are removed first. A file, a symbolic link or a folder of
            other files at ``run_dir`` is never replaced.
        progress: show progress bars (on a terminal: see :mod:`towers.progress`).
        overwrite: replace an existing run at ``run_dir`` (otherwise that is an error).
        resume: continue an interrupted training from its saved state (``train.resumable`` saves one after
            every epoch, beside the run directory; item-sequence input only). Without it, a saved state there
            is an error: it is never continued, nor discarded, unasked.
        resume_from: a trained run to start from (periodic re-fine-tuning on a newer catalog): its weights,
            with the id tables remapped by item id (see :func:`init_from_run`). ``config`` must build the same
            towers (``cli.py train --resume-from`` uses that run's config, plus any ``--set``).
        init_from: a trained run of *another* catalog to transfer from: every weight but the id vectors (ids
            name other items there), which start fresh (see :func:`init_from_run` with ``transfer``).
        zero_shot: with ``init_from``, no training at all: the transferred towers serve the new catalog from
            content alone (``config`` must have ``item.id_embedding: false``; ``cli.py train --zero-shot`` sets
            it). Validation and test are scored as usual.

    Under ``torchrun`` every process trains on its share of each batch and process 0 writes the run.

    With ``train.refit`` (resolved by :func:`train.sequence.refit_wanted`), the run keeps a second model: the
    same recipe for the epochs validation chose, with every user's validation item added to the training
    items. The result's ``valid`` is the selection model's, its ``test`` the refit model's.
    """
    t0 = time.time()
    run = RunDir(run_dir)
    if resume_from is not None and init_from is not None:
        raise ConfigError("--resume-from (the same catalog, newer) and --init-from (another catalog) exclude each "
                          "other")
    if zero_shot and (init_from is None or config.item.id_embedding):
        raise ConfigError("zero-shot serving needs --init-from RUN and item.id_embedding=false (content alone)")
    device, rank, world = init_distributed(resolve_device(config.train.device))
    if world > 1 and config.user.input != "items":
        raise ConfigError("multi-process training (torchrun) needs user.input=items")
    if resume and config.user.input != "items":
        raise ConfigError("--resume: only item-sequence training (user.input=items) saves a state to resume from; "
                          f"this config has user.input={config.user.input}")
    resume_path = run.resume_path if (config.train.resumable or resume) else None
    if resume and not (resume_path and resume_path.is_file()):
        raise CheckpointError(f"{run.resume_path}: no resumable training state to continue from")
    if not resume and resume_path is not None and resume_path.is_file():  # never continued (nor lost) unasked
        raise CheckpointError(f"{resume_path}: an interrupted training's saved state is there; pass --resume to "
                              "continue it, or delete the file to start afresh")
    # Refuses a path it may not replace before any work is done; refusals above leave no staging folder behind.
    staged = run.staging(overwrite) if rank == 0 else None
    try:
        seed_everything(config.train.seed)
        # A source run's erased users stay erased, whatever catalog this training reads.
        data = load_training_data(config, catalog_dir, Tombstones.of(resume_from) if resume_from else None)
        if config.data.protocol == "cold-items":
            logger.info("data.protocol cold-items: item.id_embedding %s (%s)", config.item.id_embedding,
                        "id vectors for known items only" if config.item.id_embedding
                        else "new and known items are ranked from their content alone")
        model = build_towers(config, num_ids=data.split.num_train_items).to(device)  # step 2
        if resume_from is not None or init_from is not None:
            init_from_run(model, resume_from or init_from, data.id_items, transfer=init_from is not None)
        bank = build_item_bank(config, model, data, device, progress and rank == 0)
        refit = None
        if config.user.input == "items":  # the LLM reads item embeddings: see train/sequence.py
            split_items = data.catalog.items[data.split_rows]
            titles = title_table(model, split_items["title"].to_list())
            prefixes = prefix_profiles(model, config, split_items)  # None unless user.profile_prefix
            best_epoch, history = (-1, []) if zero_shot else fit_sequence(
                config, model, bank, data.split, device, progress, resume_path, titles, prefixes)
            with torch.no_grad():  # step 6: the best epoch on all validation users
                valid = evaluate_sequences(model, data.split, bank.encode(model), "valid", titles=titles,
                                           prefixes=prefixes)
            if not zero_shot and refit_wanted(config.train.refit, data.split):  # the same recipe, start and epochs, plus validation items
                t_refit = time.time()
                seed_everything(config.train.seed)
                model = build_towers(config, num_ids=data.split.num_train_items).to(device)
                if resume_from is not None or init_from is not None:
                    init_from_run(model, resume_from or init_from, data.id_items, transfer=init_from is not None)
                titles = title_table(model, split_items["title"].to_list())
                prefixes = prefix_profiles(model, config, split_items)
                _, refit_history = fit_sequence(config, model, bank, data.split, device, progress, None, titles,
                                                prefixes, refit_epochs=best_epoch + 1)
                refit = {"epochs": best_epoch + 1, "seconds": round(time.time() - t_refit, 1),
                         "history": refit_history}
            with torch.no_grad():  # then test, scored once
                test = evaluate_sequences(model, data.split, bank.encode(model), "test", titles=titles,
                                          prefixes=prefixes)
        else:
            states = build_user_states(config, model, data, device, progress)
            best_epoch, history = (-1, []) if zero_shot else fit(config, model, states, bank, data.split, device,
                                                                  progress)
            with torch.no_grad():  # step 6: the best epoch on all validation users, then test, scored once
                item_emb = bank.encode(model)
                valid = evaluate_positions(model, states, data.split, item_emb, "valid")
                test = evaluate_positions(model, states, data.split, item_emb, "test")
        result = TrainResult(run.path, best_epoch, valid, test, history, time.time() - t0, refit)
        if init_from is not None:
            result.transfer = {"from": str(RunDir(init_from).path), "zero_shot": zero_shot}
        if staged is not None:
            write_run(staged, model, data, result)  # step 7
            run.publish(staged, overwrite)
            if resume_path is not None:
                resume_path.unlink(missing_ok=True)  # the run is complete: nothing left to resume
    except BaseException:
        if staged is not None:
            staged.discard()
        raise
    return result


ID_TABLES = ("item.ids.weight", "user.table.weight")  # state-dict rows indexed by id-table row
ID_MODALITY = re.compile(r"item\.fusion\.(proj|gate)\.id\..*")  # the fusion's weights for the id vector


def init_from_run(model: TwoTower, source: str | Path, items: ItemSpace, transfer: bool = False) -> dict[str, int]:
    """Load a trained run's weights into ``model``, whose id tables index ``items`` (the new split's items).

    Every checkpointed tensor is copied as it is, except the id tables (the item tower's id vectors and the
    item-sequence user tower's own input table): an item the source run learned keeps its row, moved to the
    item's new row; a new item keeps its fresh initialisation and is learned by this training. Catalog items
    outside the new split get no row (cold start: embedded from their content). A tensor the source run
    lacks or has in another shape is a :class:`CheckpointError` (it was trained with another config).

    ``transfer``: the source run learned *another* catalog, whose ids name other items: no id row is carried
    over (every one starts fresh), and a ``model`` without id vectors (``item.id_embedding: false``, content
    alone) leaves the source's id modality behind. Returns ``{"kept": ..., "new": ...}`` id rows.
    """
    src = RunDir(source).require()
    old = load_towers(src, "cpu")
    old_rows = items.to(src.read_id_table())  # (I,) new id row -> the source run's id row, -1 for a new item
    if transfer:
        old_rows[:] = -1
    known = torch.from_numpy(np.flatnonzero(old_rows >= 0))
    saved = {k: v for k, v in old.state_dict().items() if is_saved(old, k)}
    target = {k: v for k, v in model.state_dict().items() if is_saved(model, k)}
    if transfer and not model.config.item.id_embedding:
        saved = {k: v for k, v in saved.items() if k not in ID_TABLES and not ID_MODALITY.fullmatch(k)}
    missing, unexpected = sorted(set(target) - set(saved)), sorted(set(saved) - set(target))
    if missing or unexpected:
        raise CheckpointError(f"--resume-from {src.path}: its towers do not match this config (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]}); train with the run's own config")
    state = {}
    for k, want in target.items():
        have = saved[k]
        if k in ID_TABLES:
            if have.shape[1:] != want.shape[1:]:
                raise CheckpointError(f"--resume-from {src.path}: id table {k!r} has rows of {have.shape[1]}, "
                                      f"this config {want.shape[1]}")
            table = want.detach().clone()
            table[known.to(table.device)] = have[torch.from_numpy(old_rows[known.numpy()])].to(table)
            state[k] = table
        elif have.shape != want.shape:
            raise CheckpointError(f"--resume-from {src.path}: tensor {k!r} has shape {tuple(have.shape)}, this "
                                  f"config expects {tuple(want.shape)}")
        else:
            state[k] = have
    model.load_state_dict(state, strict=False)
    counts = {"kept": len(known), "new": len(items) - len(known)}
    logger.info("initialised from run %s: %d id rows kept, %d new items", src.path, counts["kept"], counts["new"])
    return counts


def write_run(run: RunDir, model: TwoTower, data: TrainingData, result: TrainResult) -> None:
    """Everything serving needs: weights and config, the catalog reference, histories, id table, metrics."""
    save_towers(model, run)
    run.write_catalog_ref(data.catalog)
    run.write_histories(data.split)
    data.erased.write(run.path)
    run.write_id_table(data.id_items.ids)
    run.write_metrics({"protocol": model.config.data.protocol, "best_epoch": result.best_epoch, "valid": result.valid, "test": result.test,
                       "history": result.history, "seconds": result.seconds,
                       **({"refit": result.refit} if result.refit else {}),
                       **({"transfer": result.transfer} if result.transfer else {})})
    plot_curves(result.history, result.best_epoch, run.curves_path,
                f"{model.config.name}: user.input={model.config.user.input}, best epoch {result.best_epoch}, "
                f"valid NDCG@10 {result.valid['ndcg@10']:.4f}")
