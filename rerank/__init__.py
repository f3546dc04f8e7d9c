"""The LLM stages above retrieval: rerankers, the reasons writer, and :class:`Pipeline`, which composes retrieval
(:mod:`index`), rerank and reasons into one query path."""

from rerank.pipeline import Pipeline

__all__ = ["Pipeline"]
