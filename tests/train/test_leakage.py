"""No leakage: the state training reads at history position ``p`` sees only the prompt up to item ``p``.

Training reads every position from one padded, batched forward pass over whole prompts (``UserStates``). Each
of those states must equal the state of a separate pass over the prompt cut right after item ``p``: then the
state that predicts item ``p + 1`` (and the validation and test states) cannot have seen that item or later ones.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from configs import load_config
from data.profiles import ProfileBuilder
from data.protocol import Split
from towers.factory import build_towers
from towers.hub import load_tokenizer
from train.loop import UserStates, user_prompts

WORDS = ("harbor lantern meadow falcon glacier orchard canyon violin compass ember thunder willow marble "
         "saddle beacon quartz prairie anchor cedar dragon").split()


def _prompts(tokenizer):
    """Prompts of four users with histories of different lengths (so batches are padded), two windows each."""
    titles = [f"The {w} of {WORDS[(3 * i + 1) % len(WORDS)]}" for i, w in enumerate(WORDS)]
    builder = ProfileBuilder(tokenizer, titles, token_budget=48, max_items=50)
    rng = np.random.default_rng(0)
    sequences = [rng.permutation(len(WORDS))[:n] for n in (5, 9, 14, 20)]
    split = Split(user_ids=list(range(4)), item_ids=list(range(len(WORDS))), sequences=sequences)
    prompts = user_prompts(split, np.arange(len(WORDS)), builder, max_positions=0, windows=2)
    return prompts, len(builder.header_ids)


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen-cached", "trainable"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_state_at_position_equals_truncated_prompt(pooling: str, trainable: bool) -> None:
    config = load_config("tiny", [f"user.pooling={pooling}", f"user.strategy={'full' if trainable else 'frozen'}",
                                  "item.image.enabled=false", "item.audio.enabled=false"])
    torch.manual_seed(0)
    model = build_towers(config).eval()
    tokenizer = load_tokenizer(config.user.model)
    prompts, content_start = _prompts(tokenizer)
    assert len(prompts) > 4  # the second windows exist
    assert len({len(p.input_ids) for p in prompts}) > 1  # batches mix lengths, so some rows are padded

    states = UserStates(model, prompts, "cpu", tokenizer.pad_token_id, content_start, batch_size=3,
                        progress=False)
    assert (states.cache is None) == trainable
    checked = 0
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            train_states, targets = states.get([i], "train")
            assert targets.tolist() == prompt.train_targets
            rows = [train_states]
            if prompt.valid_pos is not None:
                rows += [states.get([i], "valid")[0], states.get([i], "test")[0]]
            read = torch.cat(rows)  # (P, H) in read_positions order
            assert read.shape[0] == len(prompt.read_positions)
            for got, pos in zip(read, prompt.read_positions):
                cut = torch.tensor([prompt.input_ids[: pos + 1]])
                alone = model.user.states(cut, torch.ones_like(cut), content_start=content_start)[0]  # (H,)
                torch.testing.assert_close(got, alone, atol=2e-5, rtol=1e-5)
                checked += 1
    assert checked == sum(len(p.read_positions) for p in prompts)


def test_pooled_state_changes_with_the_read_item() -> None:
    """Guard against a vacuous pass: states at different positions differ, so equality above means something."""
    config = load_config("tiny", ["user.pooling=mean", "item.image.enabled=false", "item.audio.enabled=false"])
    model = build_towers(config).eval()
    tokenizer = load_tokenizer(config.user.model)
    prompts, content_start = _prompts(tokenizer)
    p = prompts[3]
    ids = torch.tensor([p.input_ids])
    positions = torch.tensor([p.read_positions])
    with torch.no_grad():
        s = model.user.states(ids, torch.ones_like(ids), positions, content_start)[0]  # (P, H)
    gaps = (s[1:] - s[:-1]).norm(dim=-1)
    assert bool((gaps > 1e-3).all()), gaps
