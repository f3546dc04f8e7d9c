"""The training loop: contrastive fine-tuning of both towers, validation each epoch, best checkpoint kept.

One LLM pass per user covers every position: the profile prompt lists the user's items oldest first
(``seq[:-1]``: training items plus the validation item) and the causal LLM's state at the end of item ``p``
sees only items ``<= p``. The state after item ``p`` is trained to retrieve item ``p + 1`` (training targets
only), the state after the last training item is scored against the validation item, and the state after
the validation item against the test item. When the LLM is frozen those states are computed once and
cached; otherwise they are recomputed with gradients each step.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from configs import Config
from towers.factory import CHECKPOINT, TwoTower, build_towers, save_towers
from towers.hub import load_tokenizer
from towers.user import pad_batch
from train.data import Catalog, catalog_sha256, load_catalog
from train.items import collate_items, frozen_features, make_item_dataset, to_device
from train.losses import info_nce
from train.metrics import ranking_metrics, target_ranks
from train.profiles import ProfileBuilder
from train.split import Split, leave_one_out

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is an error, never a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def split_catalog(config: Config, catalog: Catalog) -> Split:
    """The leave-one-out split of a catalog, with the tie-break the config (or the catalog) asks for."""
    tie_break = config.data.tie_break
    if tie_break == "auto":
        tie_break = catalog.meta.get("tie_break", "item_id")
    return leave_one_out(catalog.interactions, config.data.min_count, tie_break)


def profile_builder(config: Config, catalog_items: pl.DataFrame, tokenizer=None) -> ProfileBuilder:
    """The profile builder over catalog rows, as configured (shared by training and serving)."""
    tokenizer = tokenizer or load_tokenizer(config.user.model)
    return ProfileBuilder(
        tokenizer, catalog_items["title"].to_list(), catalog_items["text"].to_list(),
        token_budget=config.data.profile_token_budget, max_items=config.data.profile_max_items,
        text_chars=config.data.profile_text_chars,
    )


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
                raise ValueError(f"user {split.user_ids[u]!r}: the profile budget keeps only {len(prof.ends)} "
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
        if not model.config.user.trainable:
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


class ItemBank:
    """Collated inputs of every training item, built once; frozen encoders' features replace their inputs."""

    def __init__(self, dataset, split_rows: np.ndarray, frozen: dict[str, torch.Tensor], device, chunk: int = 512):
        """``frozen`` holds frozen encoders' features of the training items, in split order."""
        pad = dataset.tokenizer.pad_token_id if dataset.tokenizer is not None else 0
        batch = collate_items([dataset[int(r)] for r in split_rows], pad, dataset.cfg.image.image_size)
        for key, feats in frozen.items():
            batch[key] = feats
            batch.pop("text_input_ids" if key == "text_features" else "pixels", None)
            if key == "text_features":
                batch.pop("text_attention_mask", None)
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
        for start in range(0, len(users), 256):
            idx = users[start:start + 256]
            s, _ = states.get(idx, which)
            u = model.user.head(s)
            scores = (u @ item_emb.T).cpu()
            if which == "valid":
                targets = torch.tensor([split.valid_target(i) for i in idx])
                exclude = [split.train_seq(i) for i in idx]
            else:
                targets = torch.tensor([split.test_target(i) for i in idx])
                exclude = [split.sequences[i][:-1] for i in idx]
            ranks.append(target_ranks(scores, targets, exclude))
    out = ranking_metrics(torch.cat(ranks))
    out["users"] = len(users)
    return out


def train(config: Config, catalog_dir: str | Path, run_dir: str | Path, progress: bool = True) -> TrainResult:
    """Train both towers on a catalog and write a servable run directory.

    Args:
        config: the full setup (see ``configs/``).
        catalog_dir: a folder written by ``towerrec prepare``.
        run_dir: output folder; gets ``config.json``, ``towers.safetensors``, the catalog snapshot, the
            serving histories and ``metrics.json``.
        progress: show progress bars.
    """
    t0 = time.time()
    if config.train.negatives not in ("batch", "catalog"):
        raise ValueError(f"unknown train.negatives {config.train.negatives!r}; choose 'batch' or 'catalog'")
    seed_everything(config.train.seed)
    device = resolve_device(config.train.device)
    run_dir = Path(run_dir)
    catalog: Catalog = load_catalog(catalog_dir)
    split = split_catalog(config, catalog)

    row_of = {item_id: r for r, item_id in enumerate(catalog.items["item_id"].to_list())}
    split_rows = np.array([row_of[i] for i in split.item_ids], dtype=np.int64)  # split index -> catalog row
    id_rows = np.full(catalog.items.height, -1, dtype=np.int64)
    id_rows[split_rows] = np.arange(split.num_items)

    model = build_towers(config, num_ids=split.num_items).to(device)
    dataset = make_item_dataset(catalog, model, id_rows)
    frozen = frozen_features(model, dataset, device, config.item.text.batch_size, rows=split_rows, progress=progress)
    bank = ItemBank(dataset, split_rows, frozen, device)

    tokenizer = load_tokenizer(config.user.model)
    builder = profile_builder(config, catalog.items, tokenizer)
    prompts = user_prompts(split, split_rows, builder, config.train.max_positions, config.train.windows)
    states = UserStates(model, prompts, device, tokenizer.pad_token_id, len(builder.header_ids),
                        config.user.batch_size, progress)

    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=config.train.lr, weight_decay=config.train.weight_decay)
    prompts_per_step = max(1, config.train.batch_size // max(1, config.train.max_positions))
    trainable_prompts = [i for i, p in enumerate(prompts) if p.train_pos]
    rng = random.Random(config.train.seed)
    eval_users = list(range(split.num_users))
    if config.train.eval_users and config.train.eval_users < len(eval_users):
        eval_users = sorted(rng.sample(eval_users, config.train.eval_users))

    history, best, best_epoch, bad = [], -1.0, -1, 0
    for epoch in range(config.train.epochs):
        model.train()
        if not config.user.trainable:
            model.user.llm.eval()
        order = trainable_prompts[:]
        rng.shuffle(order)
        losses = []
        steps = range(0, len(order), prompts_per_step)
        for start in tqdm(steps, desc=f"epoch {epoch}", leave=False, disable=not progress):
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
        model.eval()
        with torch.no_grad():
            item_emb = bank.encode(model)
            valid = evaluate_positions(model, states, split, item_emb, "valid", eval_users)
        record = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"),
                  "temperature": float(1 / model.logit_scale.detach().exp().clamp(max=100)), **valid}
        history.append(record)
        logger.info("epoch %d loss %.4f valid recall@10 %.4f ndcg@10 %.4f", epoch, record["loss"],
                    valid["recall@10"], valid["ndcg@10"])
        if valid["ndcg@10"] > best:
            best, best_epoch, bad = valid["ndcg@10"], epoch, 0
            save_towers(model, run_dir)
        else:
            bad += 1
            if bad >= config.train.patience:
                break

    # Back to the best epoch's weights (the frozen backbones never changed).
    model.load_state_dict(load_file(str(run_dir / CHECKPOINT), device=str(device)), strict=False)
    model.eval()
    with torch.no_grad():
        item_emb = bank.encode(model)
        valid = evaluate_positions(model, states, split, item_emb, "valid")
        test = evaluate_positions(model, states, split, item_emb, "test")
    write_run_data(run_dir, catalog, split)
    result = TrainResult(run_dir, best_epoch, valid, test, history, time.time() - t0)
    (run_dir / "metrics.json").write_text(json.dumps(
        {"best_epoch": best_epoch, "valid": valid, "test": test, "history": history,
         "seconds": result.seconds}, indent=2))
    return result


def write_run_data(run_dir: Path, catalog: Catalog, split: Split) -> None:
    """The catalog snapshot and serving histories a run needs besides its weights.

    ``items.parquet`` is the catalog's item table; ``catalog.json`` records the catalog folder (for media)
    and its hash; ``histories.parquet`` holds each split user's sequence without the held-out test item, in
    order; ``split_items.parquet`` lists the items that were ranked during training (the id table's rows).
    """
    catalog.items.write_parquet(run_dir / "items.parquet")
    (run_dir / "catalog.json").write_text(json.dumps(
        {"path": str(Path(catalog.root).resolve()), "sha256": catalog_sha256(catalog.root)}, indent=2))
    users, items, order = [], [], []
    for u, seq in enumerate(split.sequences):
        for k, j in enumerate(seq[:-1]):
            users.append(split.user_ids[u])
            items.append(split.item_ids[int(j)])
            order.append(k)
    pl.DataFrame({"user_id": users, "item_id": items, "position": order}).write_parquet(run_dir / "histories.parquet")
    pl.DataFrame({"item_id": split.item_ids}).write_parquet(run_dir / "split_items.parquet")
