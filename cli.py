"""towerrec command line: prepare, train, build-index, reindex, train-rerank, train-reasons, query, evaluate,
serve.

Subcommands only parse arguments and call library functions. Bad input (any :class:`errors.TowerrecError`)
ends with one line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from configs import PROTOCOLS
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
    from data.tombstones import Tombstones
    from errors import CatalogError

    erased = Tombstones()
    for path in args.tombstones:  # Tombstones.read would take a missing file for an empty list
        if not os.path.isfile(path):
            raise CatalogError(f"--tombstones {path}: file not found")
        erased.update(Tombstones.read(path))
    cat = prepare(args.format, args.out, src=args.src, items=args.items, interactions=args.interactions,
                  mapping=_mapping(args.map), media_root=args.media_root,
                  drop_unknown_items=args.drop_unknown_items, overwrite=args.overwrite, tombstones=erased)
    print(f"catalog {args.out}: {cat.items.height} items, {cat.interactions.height} interactions, "
          f"{cat.interactions['user_id'].n_unique()} users")


def _forget_doc() -> str:
    return ("Removes the user's interactions from the catalog (a new version replaces it) and the run's serving "
            "histories, and lists the user's salted hash in both folders' tombstones.json, which prepare, train "
            "and reindex honour. A server drops the user at its next reload. The weights keep what they learned "
            "while the user was present: a new `train --catalog CATALOG --run NEW` (not --resume-from, which starts "
            "from these weights) trains without them.")


def cmd_forget(args) -> None:
    from data.forget import forget

    out = forget(args.run, args.user, args.catalog)
    if args.json:
        print(json.dumps(out))
        return
    print(f"forgot user {args.user!r}: {out['catalog_interactions']} interactions removed from {out['catalog']}, "
          f"{out['history_rows']} history rows from {out['run']}; its salted hash is in both tombstone lists. The "
          f"weights still hold what they learned from this user: `train --catalog {out['catalog']} --run NEW` trains "
          "without them.")


def cmd_train(args) -> None:
    from configs import load_config
    from train.loop import train

    overrides = list(args.set)
    if args.protocol is not None:
        overrides.append(f"data.protocol={args.protocol}")
    if args.device is not None:
        from towers.device import resolve_device

        resolve_device(args.device)  # an unknown or absent device is named as such, before any work
        overrides.append(f"train.device={args.device}")
    if args.zero_shot:
        if args.init_from is None:
            from errors import ConfigError

            raise ConfigError("--zero-shot serves another catalog with a run's towers: give --init-from RUN")
        overrides.append("item.id_embedding=false")  # the source's ids name its own items: content alone
    source = args.resume_from or args.init_from
    if source is not None and args.config is None:  # re-fine-tuning or transfer: the source run's own config
        from configs import config_from_dict
        from data.rundir import RunDir

        source = RunDir(source).require()
        config = config_from_dict(source.read_config().to_dict(), overrides, source=str(source.config_path))
    else:
        config = load_config(args.config or "hllm", overrides)
    result = train(config, args.catalog, args.run, progress=not (args.quiet or args.json), overwrite=args.overwrite,
                   resume=args.resume, resume_from=args.resume_from, init_from=args.init_from,
                   zero_shot=args.zero_shot)
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun, process 0 reports
        return
    if args.json:
        print(json.dumps({"run": str(result.run_dir), "protocol": config.data.protocol, "best_epoch": result.best_epoch,
                          "valid": result.valid, "test_retrieval": result.test, "seconds": round(result.seconds, 1),
                          "refit_epochs": result.refit["epochs"] if result.refit else 0,
                          **({"transfer": result.transfer} if result.transfer else {})}))
        return
    v, t = result.valid, result.test
    if args.zero_shot:
        print(f"zero-shot {result.run_dir}: the towers of {args.init_from}, untrained here, content alone (no id "
              f"vectors): valid NDCG@10 {v['ndcg@10']:.4f} Recall@10 {v['recall@10']:.4f}, test NDCG@10 "
              f"{t['ndcg@10']:.4f} Recall@10 {t['recall@10']:.4f} ({result.seconds:.1f} s)")
        return
    refit = f", refit {result.refit['epochs']} epochs with the validation items" if result.refit else ""
    print(f"trained {result.run_dir}: best epoch {result.best_epoch} of {len(result.history)}, valid NDCG@10 "
          f"{v['ndcg@10']:.4f} Recall@10 {v['recall@10']:.4f}{refit}, test NDCG@10 {t['ndcg@10']:.4f} Recall@10 "
          f"{t['recall@10']:.4f} ({result.seconds:.1f} s)")


def _check_index_flags(args) -> None:
    """build-index and reindex: refuse flag values the library would refuse, naming the flag as typed (an
    empty --factory would otherwise mean "the default")."""
    from errors import ConfigError, IndexStateError

    if args.factory is not None and not args.factory.strip():
        raise IndexStateError("--factory is empty: give a FAISS index_factory string such as 'Flat', 'HNSW32' or "
                              "'IVF256,Flat', or leave --factory out for the default")
    if args.keep < 1:
        raise ConfigError(f"--keep must be at least 1 (index versions kept, the live one included), got {args.keep}")
    for flag, value in (("--chunk-size", args.chunk_size), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if args.workers < 0:
        raise ConfigError(f"--workers must be 0 or more, got {args.workers}")


def cmd_build_index(args) -> None:
    from index.build import full_reindex

    _check_index_flags(args)
    r = full_reindex(args.run, args.catalog, args.factory, args.batch_size, args.workers, args.device,
                     progress=not args.quiet, keep_versions=args.keep, chunk_size=args.chunk_size)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, process 0 reports
        print(f"live index: {r.version} (catalog {r.catalog}: {r.catalog_source})")


def cmd_reindex(args) -> None:
    from index.reindex import reindex

    _check_index_flags(args)
    r = reindex(args.run, args.catalog, full=args.full, factory=args.factory, chunk_size=args.chunk_size,
                keep_versions=args.keep, batch_size=args.batch_size, num_workers=args.workers, device=args.device,
                progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun, process 0 reports
        return
    if args.json:
        print(json.dumps({k: (str(v) if k in ("version", "catalog") else v) for k, v in r.__dict__.items()}))
        return
    print(f"live index: {r.version} ({r.mode}: {r.embedded} embedded, {r.copied} copied; {r.added} added, "
          f"{r.edited} edited, {r.removed} removed, {r.retired} retired; {r.resumed_chunks} of {r.chunks} "
          f"chunk(s) resumed; {r.seconds:.1f} s; catalog {r.catalog}: {r.catalog_source})")


def _id_arg(value: str | None, flag: str) -> list[str] | None:
    """Comma-separated item ids of a flag (``None`` when the flag is absent)."""
    if value is None:
        return None
    ids = [v.strip() for v in value.split(",") if v.strip()]
    if not ids:
        raise QueryError(f"{flag} is empty: give comma-separated item ids")
    return ids


def cmd_query(args) -> None:
    from index.recommender import MAX_K
    from rerank.pipeline import Pipeline

    history = None
    if args.history is not None:
        history = [h.strip() for h in args.history.split(",") if h.strip()]
        if not history:
            raise QueryError("--history is empty: give comma-separated item ids, oldest first")
    if not 1 <= args.k <= MAX_K:
        raise QueryError(f"--k must be from 1 to {MAX_K}, got {args.k}")
    allow, deny = _id_arg(args.allow, "--allow"), _id_arg(args.deny, "--deny")
    rec = Pipeline.load(args.run, device=args.device)
    if args.nprobe is not None or args.ef_search is not None:
        rec.set_search_params(nprobe=args.nprobe, ef_search=args.ef_search)
    if args.rerank_mode is not None:
        rec.configure_rerank(mode=args.rerank_mode)
    results = rec.recommend(user_id=args.user, history=history, k=args.k,
                            rerank=None if args.rerank is None else args.rerank == "on",
                            allow=allow, deny=deny, where=args.where, explain=args.explain)
    hist = history if history is not None else rec.history_of(args.user)
    if args.json:
        items = [{k: v for k, v in dataclasses.asdict(r).items() if args.explain or not k.startswith("reason")}
                 for r in results]
        hint = {"hint": results.hint} if results.hint else {}
        print(json.dumps({"version": results.version, "latency_ms": round(results.latency_ms, 3),
                          "items": items, **hint}, default=str))
        return
    shown = hist[-10:]
    what = f"{len(hist)} items" if len(shown) == len(hist) else f"last {len(shown)} of {len(hist)} items"
    print(f"history ({what}, most recent last):")
    for item_id, row in zip(shown, rec._rows(shown)):
        print(f"  {item_id}: {rec.titles[row]}")
    print(f"top-{args.k}:" + (f" ({len(results)} items pass the filters)" if len(results) < args.k else ""))
    for i, r in enumerate(results, 1):
        extra = f"  llm {r.rerank_score:+.3f}" if r.rerank_score is not None else ""
        print(f"  {i:2d}. {r.item_id}: {r.title}  (score {r.score:.3f}, retrieval {r.retrieval_score:.3f}{extra})")
        if r.reason is not None:
            print(f"      {r.reason}")
    if results.hint:
        print(f"  hint: {results.hint}")
    print(f"index version {results.version}, query {results.latency_ms:.1f} ms")


def cmd_train_rerank(args) -> None:
    from train.rerank import train_reranker

    r = train_reranker(args.run, mode=args.mode, overrides=args.set, catalog_dir=args.catalog, device=args.device,
                       progress=not (args.quiet or args.json))
    if args.json:
        print(json.dumps({"run": str(r.run_dir), "mode": r.mode, "weight": r.weight, "best_step": r.best_step,
                          "steps": r.steps, "seconds": round(r.seconds, 1), "valid": r.valid}))
        return
    before, after = r.valid["retrieval"]["ndcg@10"], r.valid["fused"]["ndcg@10"]
    print(f"reranker ({r.mode}) saved into {r.run_dir}: best step {r.best_step} of {r.steps}, fusion weight "
          f"{r.weight:g}, valid NDCG@10 {before:.4f} retrieval -> {after:.4f} reranked on {r.valid['users']} users "
          f"({r.seconds:.1f} s)")


def cmd_train_reasons(args) -> None:
    from train.reasons import train_reasons

    r = train_reasons(args.run, overrides=args.set, catalog_dir=args.catalog, device=args.device,
                      progress=not (args.quiet or args.json))
    if args.json:
        print(json.dumps({k: r[k] for k in ("best_step", "steps", "valid_exact", "valid_users", "train_reasons",
                                            "seconds")} | {"run": args.run}))
        return
    zero_shot = r["history"][0]["exact"] if r.get("history") else float("nan")
    print(f"reasons adapter saved into {args.run}: best step {r['best_step']} of {r['steps']}, "
          f"{100 * r['valid_exact']:.1f}% of {r['valid_users']} validation reasons as the evidence composes them "
          f"(zero-shot {100 * zero_shot:.1f}%), {r['train_reasons']} training reasons ({r['seconds']:.1f} s)")


def cmd_evaluate(args) -> None:
    from index.evaluate import evaluate

    if args.users < 0:
        raise QueryError(f"--users must be 0 (all users) or a positive number, got {args.users}")
    pipeline = None
    if args.rerank == "on":
        from data.rundir import RunDir
        from rerank.pipeline import Pipeline

        RunDir(args.run).require().load_catalog(args.catalog)  # a changed catalog is refused before models load
        pipeline = Pipeline.load(args.run)
    out = evaluate(args.run, users=args.users, seed=args.seed, rerank=args.rerank == "on",
                   progress=not args.quiet, catalog_dir=args.catalog, recommender=pipeline)
    print(json.dumps(out, indent=None if args.json else 2))


def cmd_serve(args) -> None:
    from serve.api import serve

    serve(args.run, host=args.host, port=args.port, device=args.device, catalog_dir=args.catalog,
          poll_s=args.poll, access_log=getattr(args, "verbose", False),
          on_ready=lambda url: print(f"serving {args.run} on {url} (Ctrl-C stops)", flush=True),
          batch_size=args.batch_size, batch_wait_ms=args.batch_wait_ms, batch_items=args.batch_items,
          allow_forget=args.allow_forget)


def build_parser() -> argparse.ArgumentParser:
    from data.formats import FORMATS

    # -v is accepted before or after the subcommand (a parent parser shared by every subcommand).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log progress at INFO level (also shows transformers' own messages)")
    p = argparse.ArgumentParser(prog="towerrec", description=" ".join(__doc__.split("\n\n")[0].split()), parents=[common])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("prepare", parents=[common], help="build a catalog (items.parquet + interactions.parquet)",
                       description="Formats: " + "; ".join(f"{n}: {text}" for n, text in FORMATS.items()))
    s.add_argument("--format", choices=sorted(FORMATS), default="generic")
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
    s.add_argument("--out", required=True, help="catalog folder to write (new or empty)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an earlier catalog at --out (never a file, nor a folder with other files); "
                        "the users erased from it stay erased")
    s.add_argument("--tombstones", action="append", default=[], metavar="FILE",
                   help="a tombstones.json (of a catalog or run) whose erased users this import leaves out")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("forget", parents=[common], help="erase a user from a run and its catalog (right to erasure)",
                       description=" ".join(_forget_doc().split()))
    s.add_argument("--run", required=True)
    s.add_argument("--user", required=True, help="the user id, as in the catalog")
    s.add_argument("--catalog", help="where the run's catalog is now (default: where it was trained)")
    s.add_argument("--json", action="store_true", help="print what was removed as one JSON line")
    s.set_defaults(func=cmd_forget)

    s = sub.add_parser("train", parents=[common], help="train both towers and write a run directory")
    s.add_argument("--config", help="setup name (hllm: the default; sasrec, demo, offline, tiny, hub) or a YAML/JSON "
                                    "file (default with --resume-from: that run's config)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. train.lr=1e-4 (repeatable)")
    s.add_argument("--catalog", required=True)
    s.add_argument("--run", "--run-dir", dest="run", required=True,
                   help="run directory to write (--run-dir under torchrun, whose own --run-path takes --run)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    s.add_argument("--resume", action="store_true",
                   help="continue an interrupted training from its saved state (see train.resumable)")
    s.add_argument("--resume-from", metavar="RUN",
                   help="start from a trained run's weights (re-fine-tuning on a newer catalog; its id vectors "
                        "are kept by item id, new items start fresh); then `reindex` the new run")
    s.add_argument("--protocol", choices=PROTOCOLS,
                   help="what validation and test hold out (data.protocol; default warm): warm (leave-one-out), "
                        "cold-items (a seeded 10%% of items never trained on) or cold-users (users never trained "
                        "on, scored from their first 1, 3 and 5 items); `evaluate` scores the run's own")
    s.add_argument("--init-from", metavar="RUN",
                   help="transfer from a run trained on another catalog: every weight but the id vectors, which "
                        "start fresh (default config: that run's)")
    s.add_argument("--zero-shot", action="store_true",
                   help="with --init-from: no training; the transferred towers serve this catalog from content "
                        "alone (no id vectors), scored on its validation and test users")
    s.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the config's train.device)")
    s.add_argument("--quiet", action="store_true", help="no progress bars (they show only on a terminal anyway)")
    s.add_argument("--json", action="store_true",
                   help="print the result as one line of JSON (no progress bars): "
                        "{run, protocol, best_epoch, valid, test_retrieval, seconds, refit_epochs}")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("build-index", parents=[common],
                       help="embed the whole catalog and write a new live FAISS index version")
    s.add_argument("--run", "--run-dir", dest="run", required=True, help="run directory (--run-dir under torchrun)")
    s.add_argument("--catalog", help="catalog to index (default: the live version's, else the one the run was "
                                     "trained on)")
    s.add_argument("--factory", help="FAISS index_factory string (default: the config's index.factory)")
    _index_work_args(s)
    s.set_defaults(func=cmd_build_index)

    s = sub.add_parser("reindex", parents=[common],
                       help="bring the index up to date: embed only new and changed items (all of them when the "
                            "item tower changed), resumable, then publish a new live version")
    s.add_argument("--run", "--run-dir", dest="run", required=True, help="run directory (--run-dir under torchrun)")
    s.add_argument("--catalog", help="catalog to serve (default: the one the live version was built from, else "
                                     "the one the run was trained on)")
    s.add_argument("--factory", help="FAISS index_factory string (default: the live version's, else the config's)")
    s.add_argument("--full", action="store_true", help="embed every item again, even unchanged ones")
    s.add_argument("--json", action="store_true", help="print the result as one line of JSON")
    _index_work_args(s)
    s.set_defaults(func=cmd_reindex)

    s = sub.add_parser("query", parents=[common], help="top-k for a known user or a given history")
    s.add_argument("--run", required=True)
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--user", help="a user id from the training data")
    g.add_argument("--history", help="comma-separated item ids, oldest first (a new user)")
    s.add_argument("-k", "--k", type=int, default=10, help="items to return, 1 to 1000 (default 10)")
    s.add_argument("--rerank", choices=["on", "off"], help="default: the config's rerank.enabled")
    s.add_argument("--rerank-mode", choices=["listwise", "pointwise", "sequence"],
                   help="default: the config's rerank.mode (sequence needs `train-rerank --mode sequence` first)")
    s.add_argument("--allow", metavar="IDS", help="comma-separated item ids: recommend only among these")
    s.add_argument("--deny", metavar="IDS", help="comma-separated item ids never to recommend")
    s.add_argument("--where", metavar="CONDITION",
                   help="SQL condition on the index's item columns, e.g. \"year > 1990\" or \"title LIKE '%%(1995)'\"")
    s.add_argument("--nprobe", type=int, help="IVF lists to probe (default: the index's auto-tuned value)")
    s.add_argument("--ef-search", type=int, help="HNSW efSearch (default: the index's auto-tuned value)")
    s.add_argument("--device", default="auto")
    s.add_argument("--json", action="store_true",
                   help="one line of JSON: {version, latency_ms, items: [{item_id, title, score, ...}]}")
    s.add_argument("--explain", action="store_true",
                   help="one short reason per item, citing items of the user's history (written by the LLM, or a "
                        "template citing the most similar history items when the LLM names anything else)")
    s.set_defaults(func=cmd_query)

    s = sub.add_parser("train-rerank", parents=[common],
                       help="fine-tune the LLM reranker of a trained run with LoRA (saved into RUN/rerank/)")
    s.add_argument("--run", required=True, help="a trained run with a built index (its retriever gives candidates)")
    s.add_argument("--mode", choices=["listwise", "pointwise", "sequence"], help="default: the run's rerank.mode")
    s.add_argument("--set", action="append", default=[], metavar="rerank.FIELD=VALUE",
                   help="override a rerank setting, e.g. rerank.train_users=300 or rerank.max_minutes=30 (repeatable)")
    s.add_argument("--catalog", help="the training catalog's new location, if it moved (content must match)")
    s.add_argument("--device", default="auto")
    s.add_argument("--quiet", action="store_true", help="no progress bars (they show only on a terminal anyway)")
    s.add_argument("--json", action="store_true", help="print the result as one line of JSON (no progress bars): "
                                                       "{run, mode, weight, best_step, steps, seconds, valid}")
    s.set_defaults(func=cmd_train_rerank)

    s = sub.add_parser("train-reasons", parents=[common],
                       help="fine-tune the LM that writes personalised reasons, with LoRA (saved into RUN/rerank/)")
    s.add_argument("--run", required=True, help="a trained run with a built index")
    s.add_argument("--set", action="append", default=[], metavar="rerank.FIELD=VALUE",
                   help="override a rerank setting, e.g. rerank.train_users=300 or rerank.epochs=1 (repeatable)")
    s.add_argument("--catalog", help="the training catalog's new location, if it moved (content must match)")
    s.add_argument("--device", default="auto")
    s.add_argument("--quiet", action="store_true", help="no progress bars (they show only on a terminal anyway)")
    s.add_argument("--json", action="store_true", help="print the result as one line of JSON (no progress bars): "
                                                       "{best_step, steps, valid_exact, valid_users, train_reasons, "
                                                       "seconds, run}")
    s.set_defaults(func=cmd_train_reasons)

    s = sub.add_parser("evaluate", parents=[common], help="Recall/NDCG/MRR@5/10/20 under the leave-one-out protocol")
    s.add_argument("--run", required=True)
    s.add_argument("--catalog", help="the training catalog's new location, if it moved (content must match)")
    s.add_argument("--users", type=int, default=0, help="seeded sample of this many users (0 = all)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--rerank", choices=["on", "off"], default="on", help="also score LLM-reranked lists")
    s.add_argument("--json", action="store_true", help="one-line JSON")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("serve", parents=[common], help="HTTP API and a page over the live index (hot reload)")
    s.add_argument("--run", required=True)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    s.add_argument("--device", default="auto")
    s.add_argument("--catalog", help="catalog whose posters the page shows (default: the run's)")
    s.add_argument("--poll", type=float, default=1.0, metavar="SECONDS",
                   help="how often index/LIVE is checked for a new version (0: never reload)")
    s.add_argument("--batch-size", type=int, default=32,
                   help="dynamic batching: at most this many concurrent /recommend requests share one user-tower "
                        "forward and search (1: one request at a time)")
    s.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a batch waits for requests already on their way (a lone request never waits)")
    s.add_argument("--batch-items", type=int, default=50_000,
                   help="at most this many history items per batch (the user-tower forward's memory)")
    s.add_argument("--allow-forget", action="store_true",
                   help="let DELETE /users/{id} erase a user (as `forget` does); off: it answers 403")
    s.set_defaults(func=cmd_serve)
    return p


def _index_work_args(s: argparse.ArgumentParser) -> None:
    """Options shared by build-index and reindex."""
    s.add_argument("--batch-size", type=int)
    s.add_argument("--workers", type=int, default=0, help="DataLoader workers for decoding media")
    s.add_argument("--chunk-size", type=int, default=1024,
                   help="items per resumable chunk (a killed run resumes after the last finished chunk)")
    s.add_argument("--keep", type=int, default=3, help="index versions to keep (the live one is never deleted)")
    s.add_argument("--device", default="auto")
    s.add_argument("--quiet", action="store_true")


# Subcommands that read an existing run (``--run``); ``train`` writes one, and ``serve`` checks its address
# first (then names a missing run before loading anything).
NEEDS_RUN = ("build-index", "reindex", "query", "train-rerank", "train-reasons", "evaluate", "forget")

# towerrec's own loggers (``logging.getLogger(__name__)`` in these packages).
OWN_LOGGERS = ("cli", "configs", "data", "index", "serve", "towers", "train", "__main__")


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
        if args.command in NEEDS_RUN:  # a missing run is named before torch and the models are imported
            from data.rundir import RunDir

            RunDir(args.run).require()
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
