"""Profile prompts: a user's history as LLM text, most recent items kept within a token budget.

The prompt lists items oldest to newest, one per line. Because the user LLM is causal, its hidden state at the
last token of line ``i`` summarises items ``0..i`` only; training reads one state per line from a single
forward pass (one training example per history position), and serving reads the last one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

from configs import Config
from errors import QueryError

HEADER = "Items this user engaged with, oldest first:\n"


@dataclass(frozen=True)
class Profile:
    """Token ids of one prompt; ``ends[i]`` is the position of the last token of the ``i``-th kept item."""

    input_ids: list[int]
    ends: list[int]
    items: list[int]  # dense item indices kept, oldest first


class ProfileBuilder:
    """Builds profile prompts from dense item indices, tokenising each item's line once."""

    def __init__(self, tokenizer, titles: Sequence[str], descriptions: Sequence[str | None] | None = None,
                 token_budget: int = 128, max_items: int = 50, text_chars: int = 0):
        if token_budget < 8:
            raise ValueError(f"profile token budget {token_budget} is too small")
        self.tokenizer = tokenizer
        self.token_budget = token_budget
        self.max_items = max_items
        self.lines = [self.item_line(t, (descriptions[i] if descriptions else None), text_chars)
                      for i, t in enumerate(titles)]
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
        self.header_ids = ([bos] if bos is not None else []) + self._encode(HEADER)
        self._line_ids: list[list[int] | None] = [None] * len(self.lines)

    @staticmethod
    def item_line(title: str, description: str | None, text_chars: int) -> str:
        line = f"- {title}"
        if description and text_chars > 0:
            line += f": {description[:text_chars]}"
        return line + "\n"

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def line_ids(self, item: int) -> list[int]:
        ids = self._line_ids[item]
        if ids is None:
            ids = self._encode(self.lines[item])[: self.token_budget // 2]  # one item never fills the budget
            self._line_ids[item] = ids
        return ids

    def build(self, history: Sequence[int]) -> Profile:
        """Prompt for a chronological history (dense indices); raises on an empty history."""
        if len(history) == 0:
            raise QueryError("empty history: a profile needs at least one item")
        budget = self.token_budget - len(self.header_ids)
        kept: list[int] = []
        for item in reversed(list(history)[-self.max_items:]):
            n = len(self.line_ids(item))
            if n > budget:
                break
            budget -= n
            kept.append(int(item))
        kept.reverse()
        ids = list(self.header_ids)
        ends = []
        for item in kept:
            ids.extend(self.line_ids(item))
            ends.append(len(ids) - 1)
        return Profile(input_ids=ids, ends=ends, items=kept)

    def text(self, history: Sequence[int]) -> str:
        """The prompt as text (for display and debugging)."""
        return self.tokenizer.decode(self.build(history).input_ids, skip_special_tokens=True)


def profile_builder(config: Config, catalog_items: pl.DataFrame, tokenizer) -> ProfileBuilder:
    """The profile builder over catalog rows, as configured (shared by training and serving)."""
    return ProfileBuilder(
        tokenizer, catalog_items["title"].to_list(), catalog_items["text"].to_list(),
        token_budget=config.data.profile_token_budget, max_items=config.data.profile_max_items,
        text_chars=config.data.profile_text_chars,
    )
