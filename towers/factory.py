"""Build both towers from a config, save them to a run directory and load them back.

A checkpoint is ``config.json`` (the exact :class:`configs.Config`) plus ``towers.safetensors``. Frozen
pretrained backbones are not copied into the checkpoint: they are reloaded from the model reference in the
config, and the item-tower fingerprint (a hash over *all* item-tower weights, frozen ones included, and its
config) catches any drift between the weights an index was built with and the weights being served.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from configs import Config, config_from_dict
from towers.item import ItemTower
from towers.user import UserTower

CHECKPOINT = "towers.safetensors"
CONFIG = "config.json"


class CheckpointError(RuntimeError):
    """A run directory whose checkpoint does not match its config."""


class TwoTower(nn.Module):
    """The user tower, the item tower and the learnable InfoNCE temperature (as CLIP's ``logit_scale``)."""

    def __init__(self, config: Config, num_ids: int = 0):
        super().__init__()
        self.config = config
        self.user = UserTower(config.user, config.dim)
        self.item = ItemTower(config.item, config.dim, num_ids=num_ids)
        self.logit_scale = nn.Parameter(
            torch.tensor(math.log(1.0 / config.train.temperature)), requires_grad=config.train.learn_temperature
        )

    def frozen_prefixes(self) -> list[str]:
        """State-dict prefixes of frozen pretrained backbones (reloaded from their model reference)."""
        out = []
        if not self.config.user.trainable:
            out.append("user.llm.")
        if self.item.text is not None and not self.config.item.text.trainable:
            out.append("item.text.backbone.")
        if self.item.image is not None and not self.config.item.image.trainable and self.config.item.image.pretrained:
            out.append("item.image.visual.")
        return out


def build_towers(config: Config, num_ids: int = 0) -> TwoTower:
    """Both towers for ``config``; ``num_ids`` rows in the item-id table (0 disables it)."""
    return TwoTower(config, num_ids=num_ids)


def item_fingerprint(model: TwoTower) -> str:
    """sha256 over the item tower's config and every weight it uses (frozen backbones included)."""
    h = hashlib.sha256()
    h.update(json.dumps({"dim": model.config.dim, "item": model.config.to_dict()["item"]}, sort_keys=True).encode())
    for name, tensor in sorted(model.item.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_towers(model: TwoTower, run_dir: str | Path, extra: dict | None = None) -> None:
    """Write ``config.json`` and ``towers.safetensors`` (trainable weights) into ``run_dir``, atomically."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    frozen = tuple(model.frozen_prefixes())
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith(frozen)}
    meta = {"num_ids": str(model.item.num_ids), **{k: str(v) for k, v in (extra or {}).items()}}
    tmp = run_dir / f".{CHECKPOINT}.tmp"
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(run_dir / CHECKPOINT)
    tmp = run_dir / f".{CONFIG}.tmp"
    tmp.write_text(model.config.to_json())
    tmp.replace(run_dir / CONFIG)


def load_config_from_run(run_dir: str | Path) -> Config:
    """The exact config a run was trained with."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; is {run_dir} a towerrec run directory?")
    return config_from_dict(json.loads(path.read_text()))


def load_towers(run_dir: str | Path, device: str | torch.device = "cpu") -> TwoTower:
    """Rebuild the towers from ``config.json`` and load ``towers.safetensors``; refuses any key mismatch."""
    run_dir = Path(run_dir)
    config = load_config_from_run(run_dir)
    ckpt = run_dir / CHECKPOINT
    if not ckpt.is_file():
        raise CheckpointError(f"{ckpt}: not found")
    from safetensors import safe_open

    with safe_open(str(ckpt), framework="pt") as f:
        num_ids = int((f.metadata() or {}).get("num_ids", 0))
    model = build_towers(config, num_ids=num_ids)
    state = load_file(str(ckpt))
    frozen = tuple(model.frozen_prefixes())
    expected = {k for k in model.state_dict() if not k.startswith(frozen)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: does not match {run_dir / CONFIG} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in state.items():
        want = model.state_dict()[k].shape
        if v.shape != want:
            raise CheckpointError(f"{ckpt}: tensor {k!r} has shape {tuple(v.shape)}, config expects {tuple(want)}")
    model.load_state_dict(state, strict=False)
    return model.to(device).eval()
