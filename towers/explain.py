"""Personalised reasons: one short sentence per recommended item, citing items from the user's history.

The reranker's LM (without its adapter) continues a prompt that ends with ``Because you watched "``. Generation
is batched, greedy and capped at ``rerank.explain_tokens``, and constrained (:class:`QuotedHistoryTitles`):
inside double quotes the LM can only write, token by token, the title of one of the history items closest to
the recommendation by item embedding (``Recommender.explain`` passes three), so the item it cites is its own
choice among history items the model really links to the recommendation.

Every reason is then checked (:func:`ground`): it must cite at least one history item, and no title it names,
quoted or not, may be outside the history (a free clause after the quotes could still name another film, or
the recommendation itself as if it had been watched). A reason that fails is replaced by a template citing the
history items closest to the recommendation by item embedding (``Recommender.explain``), so no reason ever
names an item the user has not seen.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from errors import ModelLoadError
from towers.rerank import LLMReranker

PROMPT = ('Recommended next: "{title}"\nIn one short sentence, say why this user will like it, citing one or two '
          'of the items above.\nReason: Because you watched')  # then the opening quote token
OPENING = 'Because you watched "'


@dataclass(frozen=True)
class Reason:
    """A reason for one recommended item; ``str(reason)`` is its text."""

    text: str
    cites: tuple  # item ids from the user's history that the reason names, in the order it names them
    source: str  # "llm": written by the LM and grounded; "template": the fallback

    def __str__(self) -> str:
        return self.text


_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")
_ARTICLES = ("the", "a", "an", "les", "la", "le", "il", "das", "der", "die", "el")
_ARTICLE = re.compile(rf"^(.*), ({'|'.join(_ARTICLES)})$")


def normalise_title(title: str) -> str:
    """A title for matching: lower case, no year, no article (leading or trailing), no punctuation.

    ``"Godfather, The (1972)"``, ``"The Godfather"`` and ``"godfather"`` all give ``"godfather"``.
    """
    t = _YEAR.sub("", title.strip()).lower()
    t = re.sub(r"\(.*?\)", " ", t).strip()  # alternative titles: "City of Lost Children, The (Cité des ...)"
    t = _ARTICLE.sub(r"\1", t)  # "Godfather, The" -> "godfather"
    words = re.sub(r"[^\w\s]", " ", t).split()
    if len(words) > 1 and words[0] in _ARTICLES:  # "The Godfather" -> "godfather"
        words = words[1:]
    return " ".join(words)


class TitleMatcher:
    """Finds which catalog titles a text names: every quoted span, and unquoted titles of 8 characters or more."""

    def __init__(self, titles: Sequence[str]):
        self.by_norm: dict[str, list[int]] = {}
        for row, title in enumerate(titles):
            key = normalise_title(title)
            if key:
                self.by_norm.setdefault(key, []).append(row)
        # Unquoted mentions are looked for only for titles of 8 characters or more: "Heat" or "Contact" are common
        # words. A longer title that is also a phrase ("Together") makes a reason fall back to the template: safe.
        self.distinctive = [k for k in self.by_norm if len(k) >= 8]

    def mentions(self, text: str) -> tuple[list[str], list[str]]:
        """``(quoted, unquoted)``: normalised quoted spans, and distinctive catalog titles found outside quotes."""
        quoted = [normalise_title(q) for q in re.findall(r'"([^"]*)"', text)]
        outside = " " + normalise_title(re.sub(r'"[^"]*"', " ", text)) + " "
        unquoted = [k for k in self.distinctive if f" {k} " in outside]
        return [q for q in quoted if q], unquoted


def ground(text: str, matcher: TitleMatcher, history_rows: Sequence[int]) -> list[int] | None:
    """History rows a reason cites, in order; ``None`` if it names any other item or cites nothing.

    Every quoted span must be the title of a history item (an invented film, or the recommendation itself, is
    refused), and so must every distinctive catalog title named outside quotes.
    """
    allowed = set(history_rows)
    quoted, unquoted = matcher.mentions(text)
    cites: list[int] = []
    for name in quoted + unquoted:
        hits = [r for r in matcher.by_norm.get(name, []) if r in allowed]
        if not hits:
            return None
        cites += [r for r in hits if r not in cites]
    return cites or None


def finish(generated: str, capped: bool) -> str:
    """The reason's text from the LM's continuation: its first line, an unclosed quote cut off."""
    line = (OPENING + generated).split("\n", 1)[0].strip()
    if line.count('"') % 2:  # generation stopped inside a title: keep what was closed
        line = re.sub(r"(\s*(,|;|and|&))*\s*$", "", line[: line.rfind('"')])
        capped = True
    line = re.sub(r'"\s*([^"]*?)\s*"', r'"\1"', line)  # a closing quote token may carry a space: '"Heat "'
    if line.endswith((".", "!", "?")):
        return line
    return line + ("…" if capped else ".")


class QuotedHistoryTitles(LogitsProcessor):
    """Constrains generation so that whatever is written inside double quotes is a whole allowed title.

    Each row starts inside an opening quote (the prompt ends with one). Inside quotes, the next token must extend
    one of ``titles`` (token sequences, a trie), and a bare quote token closes a complete title. Outside quotes,
    a quote may only be opened by a bare quote token (no token that merges a quote with other text).
    """

    def __init__(self, titles: Sequence[Sequence[Sequence[int]]], quote_ids: set[int], merged_quote_ids: list[int],
                 start: int):
        """``titles[b]``: the allowed titles (token sequences) of batch row ``b``."""
        self.next: list[dict[tuple, set[int]]] = []
        self.complete: list[set[tuple]] = []
        for row_titles in titles:
            complete = {tuple(t) for t in row_titles if t}
            nxt: dict[tuple, set[int]] = {}
            for t in complete:
                for i in range(len(t)):
                    nxt.setdefault(t[:i], set()).add(t[i])
            self.next.append(nxt)
            self.complete.append(complete)
        self.quotes, self.merged, self.start = quote_ids, merged_quote_ids, start

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for b, row in enumerate(input_ids[:, self.start:].tolist()):
            complete, nxt = self.complete[b], self.next[b]
            inside, since = True, ()
            for t in row:
                if inside and t in self.quotes and since in complete:
                    inside = False
                elif inside:
                    since += (t,)
                elif t in self.quotes:
                    inside, since = True, ()
            if inside:
                allowed = set(nxt.get(since, ())) | (self.quotes if since in complete else set())
                if allowed:
                    keep = scores[b, sorted(allowed)].clone()
                    scores[b] = float("-inf")
                    scores[b, sorted(allowed)] = keep
            elif self.merged:
                scores[b, self.merged] = float("-inf")
        return scores


class Explainer:
    """Writes reasons with a reranker's LM (its adapter switched off: it was tuned to answer letters)."""

    def __init__(self, reranker: LLMReranker):
        self.rr = reranker
        tok = reranker.tokenizer
        tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
        quoted = [i for i, t in enumerate(tokens) if t is not None and '"' in t]
        bare = {i for i in quoted if tokens[i].replace("\u2581", " ").strip() == '"'}
        if not bare:
            raise ModelLoadError(f"the tokenizer of {reranker.model_ref!r} has no token for a bare double quote")
        self.quote_ids = bare
        self.merged_ids = [i for i in quoted if i not in bare]
        opening = reranker._encode(' "')
        self.open_id = opening[-1] if opening and opening[-1] in bare else min(bare)
        self._tails: dict[str, list[int]] = {}

    def _tail(self, title: str) -> list[int]:
        ids = self._tails.get(title)
        if ids is None:
            ids = self.rr._encode(PROMPT.format(title=title)) + [self.open_id]
            self._tails[title] = ids
        return ids

    @torch.inference_mode()
    def generate(self, profile_ids: Sequence[int], cite_titles: Sequence[str] | Sequence[Sequence[str]],
                 titles: Sequence[str]) -> list[str]:
        """One reason text per recommended title, greedy, ``rerank.explain_tokens`` new tokens at most, quoting
        only ``cite_titles``: one list for every title (the history items the prompt shows), or one list per
        title (``Recommender.explain`` gives each recommendation its most similar history items)."""
        lm, tok = self.rr.lm, self.rr.tokenizer
        device = lm.get_output_embeddings().weight.device
        stop = {t for t in tok("\n", add_special_tokens=False)["input_ids"]} | {tok.eos_token_id}
        stop.discard(None)
        per_title = bool(cite_titles) and not isinstance(cite_titles[0], str)
        if per_title and len(cite_titles) != len(titles):
            raise ValueError(f"{len(cite_titles)} lists of citable titles for {len(titles)} recommendations")
        encoded: dict[str, list[int]] = {}

        def citable(ts: Sequence[str]) -> list[list[int]]:
            return [encoded.setdefault(t, self.rr._encode(t)) for t in dict.fromkeys(ts)]

        shared = None if per_title else citable(cite_titles)
        out: list[str] = []
        bs = self.rr.cfg.batch_size
        with self.rr.base_model():
            for start in range(0, len(titles), bs):
                prompts = [list(profile_ids) + self._tail(t) for t in titles[start:start + bs]]
                width = max(len(p) for p in prompts)
                ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(prompts), width), dtype=torch.long)
                for i, p in enumerate(prompts):  # left-padded, so every row's next token comes at the same step
                    ids[i, width - len(p):] = torch.as_tensor(p)
                    mask[i, width - len(p):] = 1
                rows = range(start, start + len(prompts))
                allowed = [citable(cite_titles[i]) for i in rows] if per_title else [shared] * len(prompts)
                constraint = QuotedHistoryTitles(allowed, self.quote_ids, self.merged_ids, width)
                gen = lm.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                  max_new_tokens=self.rr.cfg.explain_tokens, do_sample=False,
                                  pad_token_id=tok.pad_token_id, eos_token_id=sorted(stop),
                                  logits_processor=[constraint])
                for row in gen[:, width:].tolist():
                    cut = next((i for i, t in enumerate(row) if t in stop or t == tok.pad_token_id), None)
                    out.append(finish(tok.decode(row[:cut], skip_special_tokens=True), capped=cut is None))
        return out


def template_reason(history_titles: Sequence[str]) -> str:
    """The fallback: ``Because you watched "X" and "Y".`` for the given (most similar) history titles."""
    quoted = [f'"{t}"' for t in history_titles]
    body = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]
    return f"Because you watched {body}."
