"""Personalised reasons: how grounded, how informative and how fast, zero-shot and fine-tuned.

For a seeded sample of validation (or test) users, ``Pipeline.explain`` writes a reason for the item each user
really engaged with next, after their history; ``train.reasons.evaluate_reasons`` scores it against the evidence
the data holds before that point (co-occurrence in other users' histories, the catalog's genres)::

    python benchmarks/bench_reasons.py --run RUN [--split valid] [--users 150] [--variants zero-shot,fine-tuned]
        [--examples 10] [--set rerank.explain_tokens=48] [--json out.json]

``zero-shot`` is the LM without a reasons adapter; ``fine-tuned`` is the run's ``train-reasons`` adapter
(``RUN/rerank/reasons.*``). ``--examples`` prints that many reasons as written, unedited.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("zero-shot", "fine-tuned")


def main() -> None:
    from data.protocol import split_catalog
    from data.rundir import RunDir
    from rerank.pipeline import Pipeline
    from train.reasons import evaluate_reasons

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a trained run with a built index")
    p.add_argument("--catalog", help="the run's training catalog, if it moved")
    p.add_argument("--split", choices=["valid", "test"], default="valid")
    p.add_argument("--users", type=int, default=150, help="seeded sample of users (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--examples", type=int, default=0, help="print this many reasons of each variant, unedited")
    p.add_argument("--set", action="append", default=[], metavar="rerank.FIELD=VALUE",
                   help="a rerank setting, e.g. rerank.explain_tokens=48 for a run trained before that default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args()

    run = RunDir(args.run).require()
    rec = Pipeline.load(run.path, device=args.device)
    for change in args.set:
        key, _, value = change.partition("=")
        rec.configure_rerank(**{key.strip().removeprefix("rerank."): yaml.safe_load(value)})
    split = split_catalog(rec.config, run.load_catalog(args.catalog), protocol="warm")  # as train-reasons
    users = list(range(split.num_users))
    users = sorted(random.Random(args.seed).sample(users, args.users)) if 0 < args.users < len(users) else users
    out = {"run": str(run.path), "split": args.split, "users": len(users), "threads": torch.get_num_threads(),
           "variants": {}}
    for name in args.variants.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose from {VARIANTS}")
        if rec.use_reasons_adapter(name == "fine-tuned") != (name == "fine-tuned"):
            print(f"{name}: {run.path} has no reasons adapter (run `cli.py train-reasons --run {run.path}`)")
            continue
        t0 = time.time()
        examples: list = []
        result = evaluate_reasons(rec, split, users, args.split, progress=args.progress, examples=examples)
        result["seconds"] = round(time.time() - t0, 1)
        out["variants"][name] = result
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in result.items()), flush=True)
        for u, _, target, reason in examples[: args.examples]:
            print(f"  user {split.user_ids[u]} | {rec.titles[target]} | {reason.source} | {reason}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
