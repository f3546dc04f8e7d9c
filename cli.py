"""towerrec command line: prepare, train, build-index, query, evaluate.

Subcommands only parse arguments and call library functions. Bad input (any :class:`errors.TowerrecError`)
ends with one line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from errors import CatalogError, QueryError, TowerrecError


def _mapping(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        src, sep, dst = p.partition("=")
        if not sep or not src.strip() or not dst.strip():
            raise CatalogError(f"--map {p!r} must look like source_column=canonical_column")
        if src.strip() in out:
            raise CatalogError(f"--map {p!r}: column {src.strip()!r} is mapped twice")
        out[src.strip()] = dst.strip()
    return out


def cmd_prepare(args) -> None:
    from data.importers import prepare

    cat = prepare(args.format, args.out, src=args.src, items=args.items, interactions=args.interactions,
                  mapping=_mapping(args.map), media_root=args.media_root,
                  drop_unknown_items=args.drop_unknown_items)
    print(f"catalog {args.out}: {cat.items.height} items, {cat.interactions.height} interactions, "
          f"{cat.interactions['user_id'].n_unique()} users")


def cmd_train(args) -> None:
    from configs import load_config
    from train.loop import train

    overrides = list(args.set)
    if args.device is not None:
        from towers.device import resolve_device

        resolve_device(args.device)  # an unknown or absent device is named as such, before any work
        overrides.append(f"train.device={args.device}")
    config = load_config(args.config, overrides)
    result = train(config, args.catalog, args.run, progress=not args.quiet, overwrite=args.overwrite,
                   resume=args.resume)
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun, process 0 reports
        return
    print(json.dumps({"run": str(result.run_dir), "best_epoch": result.best_epoch, "valid": result.valid,
                      "test_retrieval": result.test, "seconds": round(result.seconds, 1)}, indent=2))


def cmd_build_index(args) -> None:
    from index.build import build_index

    folder = build_index(args.run, args.catalog, args.factory, args.batch_size, args.workers, args.device,
                         progress=not args.quiet)
    print(f"live index: {folder}")


def cmd_query(args) -> None:
    from index.recommender import Recommender

    history = None
    if args.history is not None:
        history = [h.strip() for h in args.history.split(",") if h.strip()]
        if not history:
            raise QueryError("--history is empty: give comma-separated item ids, oldest first")
    if args.k < 1:
        raise QueryError(f"-k must be at least 1, got {args.k}")
    rec = Recommender.load(args.run, device=args.device)
    results = rec.recommend(user_id=args.user, history=history, k=args.k,
                            rerank=None if args.rerank is None else args.rerank == "on")
    hist = history if history is not None else rec.history_of(args.user)
    if args.json:
        print(json.dumps([r.__dict__ for r in results], default=str))
        return
    shown = hist[-10:]
    what = f"{len(hist)} items" if len(shown) == len(hist) else f"last {len(shown)} of {len(hist)} items"
    print(f"history ({what}, most recent last):")
    for item_id, row in zip(shown, rec._rows(shown)):
        print(f"  {item_id}: {rec.titles[row]}")
    print(f"top-{args.k}:")
    for i, r in enumerate(results, 1):
        extra = f"  llm {r.rerank_score:+.3f}" if r.rerank_score is not None else ""
        print(f"  {i:2d}. {r.item_id}: {r.title}  (score {r.score:.3f}, retrieval {r.retrieval_score:.3f}{extra})")


def cmd_evaluate(args) -> None:
    from index.evaluate import evaluate

    if args.users < 0:
        raise QueryError(f"--users must be 0 (all users) or a positive number, got {args.users}")
    out = evaluate(args.run, users=args.users, seed=args.seed, rerank=args.rerank == "on",
                   progress=not args.quiet, catalog_dir=args.catalog)
    print(json.dumps(out, indent=None if args.json else 2))


def build_parser() -> argparse.ArgumentParser:
    from data.importers import IMPORTERS

    # -v is accepted before or after the subcommand (a parent parser shared by every subcommand).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log progress at INFO level (also shows transformers' own messages)")
    p = argparse.ArgumentParser(prog="towerrec", description=__doc__.splitlines()[0], parents=[common])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("prepare", parents=[common], help="build a catalog (items.parquet + interactions.parquet)",
                       description="Formats: " + "; ".join(f"{n}: {imp.description}" for n, imp in IMPORTERS.items()))
    s.add_argument("--format", choices=sorted(IMPORTERS), default="generic")
    s.add_argument("--src", help="dataset folder for the movielens formats (movielens-100k: default "
                                 "$TOWERREC_ML100K, else ../shared/datasets/movielens-100k-mm)")
    s.add_argument("--items", help="generic: items CSV/Parquet")
    s.add_argument("--interactions", help="generic: interactions CSV/Parquet")
    s.add_argument("--map", action="append", default=[], metavar="SRC=DST",
                   help="generic: rename a source column to a canonical one (repeatable)")
    s.add_argument("--media-root", help="generic: folder that media paths are relative to "
                                        "(default: the items file's folder)")
    s.add_argument("--drop-unknown-items", action="store_true",
                   help="generic: drop interactions whose item is not in the items table instead of failing")
    s.add_argument("--out", required=True, help="catalog folder to write")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("train", parents=[common], help="train both towers and write a run directory")
    s.add_argument("--config", default="hllm", help="setup name (hllm: the default; sasrec, demo, offline, tiny, hub) or a YAML/JSON file")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. train.lr=1e-4 (repeatable)")
    s.add_argument("--catalog", required=True)
    s.add_argument("--run", "--run-dir", dest="run", required=True,
                   help="run directory to write (--run-dir under torchrun, whose own --run-path takes --run)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    s.add_argument("--resume", action="store_true",
                   help="continue an interrupted training from its saved state (see train.resumable)")
    s.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the config's train.device)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("build-index", parents=[common],
                       help="embed the catalog and write a new live FAISS index version")
    s.add_argument("--run", required=True)
    s.add_argument("--catalog", help="catalog to index (default: the one the run was trained on)")
    s.add_argument("--factory", help="FAISS index_factory string (default: the config's index.factory)")
    s.add_argument("--batch-size", type=int)
    s.add_argument("--workers", type=int, default=0, help="DataLoader workers for decoding media")
    s.add_argument("--device", default="auto")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_build_index)

    s = sub.add_parser("query", parents=[common], help="top-k for a known user or a given history")
    s.add_argument("--run", required=True)
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--user", help="a user id from the training data")
    g.add_argument("--history", help="comma-separated item ids, oldest first (a new user)")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--rerank", choices=["on", "off"], help="default: the config's rerank.enabled")
    s.add_argument("--device", default="auto")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_query)

    s = sub.add_parser("evaluate", parents=[common], help="Recall/NDCG/MRR@5/10/20 under the leave-one-out protocol")
    s.add_argument("--run", required=True)
    s.add_argument("--catalog", help="the training catalog's new location, if it moved (content must match)")
    s.add_argument("--users", type=int, default=0, help="seeded sample of this many users (0 = all)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--rerank", choices=["on", "off"], default="on", help="also score LLM-reranked lists")
    s.add_argument("--json", action="store_true", help="one-line JSON")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_evaluate)
    return p


# towerrec's own loggers (``logging.getLogger(__name__)`` in these packages).
OWN_LOGGERS = ("cli", "configs", "data", "index", "towers", "train", "__main__")


def _own_or_error(record: logging.LogRecord) -> bool:
    """Without -v, third-party warnings stay quiet (open_clip warns on the root logger that a tower it was
    asked to build from scratch has no pretrained weights); their errors and towerrec's warnings still show."""
    return record.levelno >= logging.ERROR or record.name.split(".")[0] in OWN_LOGGERS


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 for bad input, with one line on stderr)."""
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if not verbose:
        handler.addFilter(_own_or_error)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])
    try:
        args.func(args)
    except TowerrecError as err:
        message = " ".join(str(err).split("\n"))
        print(f"towerrec {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
