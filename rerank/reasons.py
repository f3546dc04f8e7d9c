"""Personalised reasons: one short sentence per recommended item, citing items from the user's history.

The data chooses what a reason may rest on; the LM writes it. For each recommendation the history items shown
in the prompt are ranked by evidence (:func:`evidence_order`): how strongly other users' histories tie each to
the recommendation (:class:`CoOccurrence`), then item-embedding similarity (which is all a new item has). The
prompt names the recommendation and its genres (when the catalog has a ``genres`` column), the top
``EXPLAIN_CANDIDATES`` of those items with the genres each shares with it, and ends with ``Because you watched "``::

    Recommended next: "Ronin (1998)" (action, crime, thriller)
    Related items this user watched (genres in common): "Heat (1995)" (action, crime, thriller); "Fargo (1996)" (crime)
    In one short sentence, say why this user will like it, citing one or two of those items.
    Reason: Because you watched "

Generation is batched, greedy, capped at ``rerank.explain_tokens`` and constrained
(:class:`QuotedHistoryTitles`): inside double quotes the LM can only write, token by token, one of those items'
titles, each at most once. The LM is the reranker's (its listwise or pointwise adapter switched off), or a
reasons adapter fine-tuned by ``towerrec train-reasons`` (``train/reasons.py``) to write the sentence
:func:`template_reason` composes from the same evidence: ``Because you watched "Heat (1995)" and "Fargo (1996)":
another action/crime pick.``

Every reason is then checked (:func:`check_reason`, :func:`ground`, :func:`genre_claims`): it must be one finished
sentence of at most ``MAX_REASON_WORDS`` words besides its titles, quote only exact titles of the history (the
catalog's strings, case and spacing included), and be written, outside those quotes, in plain lowercase words
of its evidence or of :data:`rerank.reason_words.COMMON_WORDS` (an LM with random or degenerate weights writes
word pieces that fail this); it must cite at least one history item, no title it names, quoted or not, may be
outside the history, and every genre it names must be one the recommendation shares with an item it cites. A
reason that fails is replaced by :func:`template_reason` over the two history items with the most evidence, so no
reason names an item the user has not seen or a genre the data does not back, and none is word salad.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import LogitsProcessor

from errors import ModelLoadError
from rerank.llm import LLMReranker
from rerank.reason_words import COMMON_WORDS

PROMPT = ('Recommended next: "{title}"{about}\nRelated items this user watched (genres in common): {related}\nIn one '
          'short sentence, say why this user will like it, citing one or two of those items.\nReason: Because you '
          'watched')
# then the opening quote token
OPENING = 'Because you watched "'
REASONS = "reasons"  # the reasons adapter's name in a run's rerank/ folder (reasons.safetensors, reasons.json)
_PROMPT_WORDS = frozenset(w.lower() for w in re.findall(r"[A-Za-z]+", PROMPT))  # the instruction's own words


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


MAX_REASON_WORDS = 30  # words outside the quoted titles: one short sentence (the template uses at most 6)
MAX_REASON_CHARS = 400  # the whole reason, titles included
_OTHER_QUOTES = "\u201c\u201d\u201e\u201f\u00ab\u00bb\u2039\u203a\u300c\u300d\u300e\u300f`"  # only straight " quotes
_WORD = re.compile(r"[A-Za-z]+(?:['\u2019-][A-Za-z]+)*")
_OUTSIDE = re.compile(r"[A-Za-z'\u2019\s,;:.!?/&-]*")  # letters and sentence punctuation: no digits, brackets, symbols


def _words(text: str) -> list[str]:
    return [w.replace("\u2019", "'") for w in _WORD.findall(text)]


def check_reason(text: str, titles: Sequence[str], evidence: Sequence[str] = ()) -> str | None:
    """Why the LM's reason ``text`` is refused, or ``None`` when its form passes every check.

    ``titles`` are the exact titles it may quote (the user's history, as the catalog spells them); ``evidence``
    are other strings whose words it may use (the recommendation's title, the catalog's genres). The reason must:

    - start with ``Because you watched "``, be at most ``MAX_REASON_CHARS`` long and end a finished sentence
      (``.``, ``!`` or ``?``; a text cut at ``rerank.explain_tokens`` ends with ``…`` and is refused);
    - quote with straight double quotes only, each quoted span exactly one of ``titles`` and none twice;
    - outside the quotes, hold letters and sentence punctuation only (no digits, brackets, symbols or other
      scripts), at most ``MAX_REASON_WORDS`` words, each lowercase (the first word, and words spelt so in
      ``titles`` or ``evidence``, may be capitalised) and each a word of the prompt, of ``titles``, of
      ``evidence`` or of :data:`rerank.reason_words.COMMON_WORDS`.

    A greedy text from random weights (word pieces, sub-word fragments, ``[unused]`` tokens, numbers, profanity)
    fails the last check with near certainty: a random piece of a 30k-262k vocabulary is rarely a whole plain
    word, let alone one of the ~1,000 this allows.
    """
    if not text.startswith(OPENING):
        return f"does not start with {OPENING!r}"
    if len(text) > MAX_REASON_CHARS:
        return f"longer than {MAX_REASON_CHARS} characters"
    if not text.endswith((".", "!", "?")):
        return "not a finished sentence"
    if any(q in text for q in _OTHER_QUOTES) or text.count('"') % 2:
        return "quotes other than pairs of straight double quotes"
    quoted = re.findall(r'"([^"]*)"', text)
    allowed = set(titles)
    for q in quoted:
        if q not in allowed:
            return f"quotes {q!r}, which is not exactly a title of the history"
    if len(set(quoted)) < len(quoted):
        return "quotes a title twice"
    outside = re.sub(r'"[^"]*"', " ", text)
    if not _OUTSIDE.fullmatch(outside):
        bad = sorted({c for c in outside if not _OUTSIDE.fullmatch(c)})
        return f"characters other than letters and punctuation outside the titles: {''.join(bad)!r}"
    words = _words(outside)
    if len(words) > MAX_REASON_WORDS:
        return f"{len(words)} words besides the titles, more than {MAX_REASON_WORDS}"
    spelt = {w for t in (*titles, *evidence) for w in _words(t)}
    known = COMMON_WORDS | _PROMPT_WORDS | {w.lower() for w in spelt}
    for i, w in enumerate(words):
        if w != w.lower() and not (i == 0 and w == w.capitalize()) and w not in spelt and w != "I":
            return f"{w!r} is not lowercase"
        if w.lower() not in known:
            return f"{w!r} is not a word of its evidence or of plain English"
    return None


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
    """Constrains generation so that whatever is written inside double quotes is a whole allowed title, each
    title at most once.

    Each row starts inside an opening quote (the prompt ends with one). Inside quotes, the next token must extend
    one of ``titles`` not quoted yet (token sequences), and a bare quote token closes a complete title. Outside
    quotes, a quote may only be opened by a bare quote token (no token that merges a quote with other text), and
    not at all once every title has been quoted.
    """

    def __init__(self, titles: Sequence[Sequence[Sequence[int]]], quote_ids: set[int], merged_quote_ids: list[int],
                 start: int):
        """``titles[b]``: the allowed titles (token sequences) of batch row ``b``."""
        self.titles = [{tuple(t) for t in row_titles if t} for row_titles in titles]
        self.quotes, self.merged, self.start = quote_ids, merged_quote_ids, start

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for b, row in enumerate(input_ids[:, self.start:].tolist()):
            left = set(self.titles[b])  # titles not quoted yet
            inside, since = True, ()
            for t in row:
                if inside and t in self.quotes and since in left:
                    inside = False
                    left.discard(since)
                elif inside:
                    since += (t,)
                elif t in self.quotes:
                    inside, since = True, ()
            if inside:
                n = len(since)
                allowed = {x[n] for x in left if len(x) > n and x[:n] == since} | (self.quotes if since in left else set())
                if allowed:
                    keep = scores[b, sorted(allowed)].clone()
                    scores[b] = float("-inf")
                    scores[b, sorted(allowed)] = keep
            else:
                banned = self.merged + (sorted(self.quotes) if not left else [])
                if banned:
                    scores[b, banned] = float("-inf")
        return scores


@dataclass(frozen=True)
class Ask:
    """What one reason is written about: the recommendation, and the history items it may cite, best first."""

    title: str
    genres: tuple[str, ...]  # the recommendation's genres (empty when the catalog has none)
    related: tuple[tuple[str, tuple[str, ...]], ...]  # each citable history item: (title, genres it shares with
    #                                                    the recommendation)


def _about(genres: Sequence[str]) -> str:
    return f" ({', '.join(genres)})" if genres else ""


class Explainer:
    """Writes reasons with a text LM: the reranker's with its adapter switched off (it was tuned to answer
    letters), or, with ``adapter=True``, one whose adapter was fine-tuned to write reasons."""

    def __init__(self, reranker: LLMReranker, adapter: bool = False):
        self.rr = reranker
        self.adapter = adapter
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
        closing = reranker._encode('"')
        self.close_id = closing[0] if len(closing) == 1 and closing[0] in bare else self.open_id
        # A line break or the end of text ends a reason (a tokenizer with neither, like BERT's: its separator).
        stop = {*tok("\n", add_special_tokens=False)["input_ids"], tok.eos_token_id} - {None}
        self.stop_ids = sorted(stop or {tok.sep_token_id} - {None})

    def prompt_tail(self, ask: Ask) -> list[int]:
        """The prompt after the profile, up to and including the opening quote of the first citation."""
        related = "; ".join(f'"{t}"{_about(g)}' for t, g in ask.related)
        return self.rr._encode(PROMPT.format(title=ask.title, about=_about(ask.genres), related=related)) + [self.open_id]

    def continuation_ids(self, titles: Sequence[str], genres: Sequence[str] = ()) -> list[int]:
        """The tokens that write :func:`template_reason` ``(titles, genres)`` after :meth:`prompt_tail`, as the
        constrained generation would (each title as :class:`QuotedHistoryTitles` allows it, bare quotes), then a
        line break, which ends generation: the target of reasons fine-tuning."""
        enc = self.rr._encode
        ids: list[int] = []
        for i, title in enumerate(titles):
            if i:
                ids += enc(" and" if i == len(titles) - 1 else ",") + [self.open_id]
            ids += enc(title) + [self.close_id]
        ids += enc(f": another {'/'.join(genres)} pick." if genres else ".")
        return ids + self.stop_ids[:1]

    @torch.inference_mode()
    def generate(self, profile_ids: Sequence[int], asks: Sequence[Ask]) -> list[str]:
        """One reason text per :class:`Ask`, greedy, ``rerank.explain_tokens`` new tokens at most, quoting only
        the ask's related titles."""
        return self.generate_batch([profile_ids] * len(asks), asks)

    @torch.inference_mode()
    def generate_batch(self, profiles: Sequence[Sequence[int]], asks: Sequence[Ask]) -> list[str]:
        """:meth:`generate` with one profile per ask (asks of several users share forward passes)."""
        lm, tok = self.rr.lm, self.rr.tokenizer
        device = lm.get_output_embeddings().weight.device
        encoded: dict[str, list[int]] = {}
        out: list[str] = []
        bs = self.rr.cfg.batch_size
        with (contextlib.nullcontext() if self.adapter else self.rr.base_model()):
            for start in range(0, len(asks), bs):
                chunk = asks[start:start + bs]
                prompts = [list(p) + self.prompt_tail(a) for p, a in zip(profiles[start:start + bs], chunk)]
                width = max(len(p) for p in prompts)
                ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(prompts), width), dtype=torch.long)
                for i, p in enumerate(prompts):  # left-padded, so every row's next token comes at the same step
                    ids[i, width - len(p):] = torch.as_tensor(p)
                    mask[i, width - len(p):] = 1
                allowed = [[encoded.setdefault(t, self.rr._encode(t)) for t in dict.fromkeys(t for t, _ in a.related)]
                           for a in chunk]
                constraint = QuotedHistoryTitles(allowed, self.quote_ids, self.merged_ids, width)
                gen = lm.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                  max_new_tokens=self.rr.cfg.explain_tokens, do_sample=False,
                                  pad_token_id=tok.pad_token_id, eos_token_id=self.stop_ids,
                                  logits_processor=[constraint])
                for row in gen[:, width:].tolist():
                    cut = next((i for i, t in enumerate(row) if t in self.stop_ids or t == tok.pad_token_id), None)
                    out.append(finish(tok.decode(row[:cut], skip_special_tokens=True), capped=cut is None))
        return out


class CoOccurrence:
    """How strongly users' histories tie items together: for items ``a`` and ``b``, ``n(a, b) / sqrt(n(a) n(b))``,
    the cosine of the sets of users who engaged with each ("people who watched A also watched B").

    Built from histories of rows (index-table rows, any order). A pair shared by fewer than ``min_count`` users
    scores 0: one shared user is chance. :meth:`strength` can leave one user out (a training example whose target
    is in that user's own history must not count that user as evidence for itself).
    """

    def __init__(self, histories: Sequence[Sequence[int]], num_items: int, min_count: int = 2):
        users = [np.unique(np.asarray(h, dtype=np.int64)) for h in histories]
        lengths = np.asarray([len(u) for u in users], dtype=np.int64)
        self.user_ptr = np.concatenate([[0], np.cumsum(lengths)])
        self.user_items = np.concatenate(users) if users else np.zeros(0, dtype=np.int64)
        if len(self.user_items) and (self.user_items.min() < 0 or self.user_items.max() >= num_items):
            raise ValueError(f"co-occurrence: a history row is outside 0..{num_items - 1}")
        owners = np.repeat(np.arange(len(users), dtype=np.int64), lengths)
        order = np.argsort(self.user_items, kind="stable")
        self.item_users = owners[order]  # users of each item, item by item
        self.item_ptr = np.searchsorted(self.user_items[order], np.arange(num_items + 1))
        self.count = np.diff(self.item_ptr)  # users per item
        self.num_items, self.min_count = num_items, min_count

    def strength(self, target: int, rows: Sequence[int], exclude_user: int | None = None) -> np.ndarray:
        """``(len(rows),)`` co-occurrence cosine of each row with ``target`` (``exclude_user`` not counted)."""
        rows = np.asarray(rows, dtype=np.int64)
        users = self.item_users[self.item_ptr[target]:self.item_ptr[target + 1]]
        count = self.count.copy()
        if exclude_user is not None:
            users = users[users != exclude_user]
            own = self.user_items[self.user_ptr[exclude_user]:self.user_ptr[exclude_user + 1]]
            count[own] -= 1
        if not len(users) or not len(rows):
            return np.zeros(len(rows))
        items = np.concatenate([self.user_items[self.user_ptr[u]:self.user_ptr[u + 1]] for u in users])
        shared = np.bincount(items, minlength=self.num_items)[rows].astype(np.float64)
        shared[shared < self.min_count] = 0
        return shared / np.sqrt(np.maximum(count[rows], 1) * len(users))


_NO_GENRE = {"", "(no genres listed)", "unknown"}


def genre_list(genres: str | None) -> tuple[str, ...]:
    """The genres of a catalog ``genres`` cell (comma- or pipe-separated), lower case, in order."""
    if not genres:
        return ()
    out = [g.strip().lower() for g in re.split(r"[,|]", genres)]
    return tuple(dict.fromkeys(g for g in out if g not in _NO_GENRE))


def shared_genres(target: Sequence[str], cited: Sequence[Sequence[str]], limit: int = 2) -> tuple[str, ...]:
    """The recommendation's genres that a cited item has too, in the recommendation's order (at most ``limit``)."""
    theirs = {g for c in cited for g in c}
    return tuple(g for g in target if g in theirs)[:limit]


def genre_claims(text: str, vocabulary: Sequence[str]) -> set[str]:
    """The catalog genres a reason names outside quotes (whole words: "crime", "sci-fi", "film-noir")."""
    outside = " " + re.sub(r'"[^"]*"', " ", text).lower() + " "
    return {g for g in vocabulary if re.search(rf"(?<![\w-]){re.escape(g)}(?![\w-])", outside)}


def template_reason(history_titles: Sequence[str], genres: Sequence[str] = ()) -> str:
    """``Because you watched "X" and "Y": another crime/thriller pick.`` for the given history titles and the
    genres the recommendation shares with them (no genre clause without any)."""
    quoted = [f'"{t}"' for t in history_titles]
    body = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]
    return f"Because you watched {body}" + (f": another {'/'.join(genres)} pick." if genres else ".")


def evidence_order(strength: np.ndarray, similarity: np.ndarray | None) -> list[int]:
    """Indices of history items, most evidence first: co-occurrence ``strength``, then item-embedding
    ``similarity`` (None: unknown), then the most recent (the higher index) first."""
    n = len(strength)
    sim = similarity if similarity is not None else np.zeros(n)
    return sorted(range(n), key=lambda i: (-strength[i], -sim[i], -i))
