"""Build both towers from a config, save them to a run directory and load them back.

A checkpoint is the run's config (the exact :class:`configs.Config`) plus its safetensors weights; the file
names belong to :class:`data.rundir.RunDir`. Frozen
pretrained backbones are not copied into the checkpoint: they are reloaded from the model reference in the
config, and the item-tower fingerprint (a hash over *all* item-tower weights, frozen ones included, and its
config) catches any drift between the weights an index was built with and the weights being served.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from configs import Config
from data.atomic import write_text
from data.catalog import Catalog
from data.items import ItemDataset
from data.rundir import RunDir
from errors import CheckpointError
from towers.hub import load_tokenizer
from towers.item import ItemTower
from towers.sequence import ItemSequenceUserTower
from towers.user import UserTower


class TwoTower(nn.Module):
    """The user tower, the item tower and the learnable InfoNCE temperature (as CLIP's ``logit_scale``)."""

    def __init__(self, config: Config, num_ids: int = 0):
        super().__init__()
        self.config = config
        if config.user.input == "items":
            self.user = ItemSequenceUserTower(config.user, config.dim, num_ids=num_ids)
        else:
            self.user = UserTower(config.user, config.dim)
        self.item = ItemTower(config.item, config.dim, num_ids=num_ids)
        self.logit_scale = nn.Parameter(
            torch.tensor(math.log(1.0 / config.train.temperature)), requires_grad=config.train.learn_temperature
        )

    def frozen_prefixes(self) -> list[str]:
        """State-dict prefixes of frozen pretrained backbones (reloaded from their model reference)."""
        out = []
        user = self.config.user
        if user.init == "pretrained" and user.strategy in ("frozen", "lora"):
            out.append("user.llm.")  # under LoRA only the adapters train: see is_saved
        if user.input == "items" and user.profile_prefix:
            out.append("user.profile.")  # the frozen LLM that reads the prefix profile
        if self.item.text is not None and not self.config.item.text.trainable:
            out.append("item.text.backbone.")
        if self.item.image is not None and not self.config.item.image.trainable and self.config.item.image.pretrained:
            out.append("item.image.visual.")
        if self.item.audio is not None and not self.config.item.audio.trainable and self.config.item.audio.pretrained:
            out.append("item.audio.model.")
        return out


def build_towers(config: Config, num_ids: int = 0) -> TwoTower:
    """Both towers for ``config``; ``num_ids`` rows in the item-id table (0 disables it)."""
    return TwoTower(config, num_ids=num_ids)


def hash_weights(module: nn.Module, h=None):
    """Feed every entry of ``module``'s state dict (name and bytes, in name order) into a sha256; returns it."""
    h = h or hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h


def item_fingerprint(model: TwoTower) -> str:
    """sha256 over the item tower's config and every weight it uses (frozen backbones included)."""
    h = hashlib.sha256()
    h.update(json.dumps({"dim": model.config.dim, "item": model.config.to_dict()["item"]}, sort_keys=True).encode())
    return hash_weights(model.item, h).hexdigest()


def save_towers(model: TwoTower, run_dir: str | Path | RunDir, extra: dict | None = None) -> None:
    """Write the config and the trainable weights into ``run_dir``, each file atomically."""
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    run.path.mkdir(parents=True, exist_ok=True)
    state = trainable_state(model)
    meta = {"num_ids": str(model.item.num_ids), **{k: str(v) for k, v in (extra or {}).items()}}
    tmp = run.path / f".{run.WEIGHTS}.tmp"
    tmp.write_bytes(save(state, metadata=meta))  # not save_file: it creates the file 0600, whatever the umask
    tmp.replace(run.weights_path)
    write_text(run.config_path, model.config.to_json())


def is_saved(model: TwoTower, key: str) -> bool:
    """Whether a state-dict entry goes into the checkpoint: everything but frozen pretrained weights (LoRA
    adapters of a frozen LLM are saved; its base weights reload from the model reference)."""
    return not key.startswith(tuple(model.frozen_prefixes())) or "lora_" in key


def trainable_state(model: TwoTower) -> dict[str, torch.Tensor]:
    """The state dict without frozen pretrained backbones (those reload from their model reference)."""
    # clone: on the CPU, .cpu() would return the live parameters, which later optimizer steps change in place
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items() if is_saved(model, k)}


def load_config_from_run(run_dir: str | Path | RunDir) -> Config:
    """The exact config a run was trained with."""
    return (run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)).read_config()


def load_towers(run_dir: str | Path | RunDir, device: str | torch.device = "cpu") -> TwoTower:
    """Rebuild the towers from the run's config and load its weights; refuses any key or shape mismatch."""
    run = (run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)).require()
    config = run.read_config()
    ckpt = run.weights_path
    try:
        with safe_open(str(ckpt), framework="pt") as f:
            num_ids = int((f.metadata() or {}).get("num_ids", 0))
        state = load_file(str(ckpt))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{ckpt}: unreadable or truncated weights ({err}); retrain the run") from None
    model = build_towers(config, num_ids=num_ids)
    expected = {k for k in model.state_dict() if is_saved(model, k)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: does not match {run.config_path} (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    for k, v in state.items():
        want = model.state_dict()[k].shape
        if v.shape != want:
            raise CheckpointError(f"{ckpt}: tensor {k!r} has shape {tuple(v.shape)}, config expects {tuple(want)}")
    model.load_state_dict(state, strict=False)
    return model.to(device).eval()


def make_item_dataset(catalog: Catalog, model: TwoTower, id_rows: np.ndarray | None = None) -> ItemDataset:
    """An :class:`ItemDataset` wired to the model's text tokenizer and image normalisation."""
    cfg = model.config
    tokenizer = load_tokenizer(cfg.item.text.model) if cfg.item.text.enabled else None
    norm = (model.item.image.image_mean, model.item.image.image_std) if model.item.image is not None else None
    return ItemDataset(catalog, cfg, tokenizer, norm, id_rows)
