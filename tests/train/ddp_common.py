"""One training step of the item-sequence trainer, shared by the single-process test and the DDP workers."""

from __future__ import annotations

import torch

from configs import load_config

# Dropouts off: each process would otherwise draw its own masks, and only the sums are comparable.
OVERRIDES = ["user.input=items", "user.init=random", "user.dropout=0", "item.modality_dropout=0",
             "item.text.enabled=false", "item.image.enabled=false", "item.audio.enabled=false",
             "train.batch_size=6", "data.min_count=3"]


def one_step(catalog: str, loss: str) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss share and gradients (after DDP's averaging, when distributed) of the first global batch."""
    from towers.factory import build_towers
    from train.loop import build_item_bank, load_training_data, seed_everything
    from train.sequence import SequenceTrainer, training_windows

    config = load_config("tiny", [*OVERRIDES, f"train.loss={loss}", "train.num_negatives=5"])
    seed_everything(0)
    data = load_training_data(config, catalog)
    model = build_towers(config, num_ids=data.split.num_items)
    bank = build_item_bank(config, model, data, torch.device("cpu"), progress=False)
    trainer = SequenceTrainer(config, model, bank, data.split, torch.device("cpu"),
                              training_windows(data.split, config.user.max_len))
    value = trainer.loss(torch.arange(6))
    value.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(value.detach()), grads
