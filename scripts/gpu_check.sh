#!/usr/bin/env bash
# GPU checks on the lent device machine (Python 3.12, torch 2.11, transformers 5.17; no polars, faiss, open_clip
# or soundfile there). Three back-to-back calls bring what is missing (64 MiB per call; all ignored by git):
#   1. .whl1/ (polars runtime)        -> pip install --target /tmp/site
#   2. .gpu/gemma4 (written by scripts/gpu_export_gemma.py: Gemma-3-270M's first 4 layers) and .gpu/cache
#      (towerrec's random tiny presets) -> /tmp
#   3. .whl2/ (the other cp312 wheels) and .gpu/datasets (ML-100K with posters, latest-small, 4 audio clips),
#      then this script.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl2/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOWERREC_CACHE=/tmp/cache
OUT=${OUT:-/tmp/out}
mkdir -p ../shared/datasets && cp -r .gpu/datasets/* ../shared/datasets/
nvidia-smi -L
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
# 1. the gpu-marked tests, and the reranker on this transformers version (the 5.17 cache-API crash)
python3 -m pytest -q -p no:cacheprovider -m gpu tests/train/test_device.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -3
python3 -m pytest -q -p no:cacheprovider -x tests/towers/test_rerank.py tests/train/test_sequence.py \
    tests/train/test_device.py 2>&1 | tee "$OUT/tests_on_gpu_machine.log" | tail -3
# 2. real fine-tunes: the item-sequence user tower on ML-100K (id + posters; MiniLM does not travel), bf16 autocast
python3 cli.py prepare --format movielens-100k --src ../shared/datasets/movielens-100k-mm --out /tmp/cat/ml100k
python3 cli.py prepare --format movielens-latest --src ../shared/datasets/movielens-latest-small --out /tmp/cat/mlls
BASE="user.input=items item.text.enabled=false item.audio.enabled=false train.batch_size=128 train.epochs=20
      train.patience=3 user.head_hidden=0 train.device=cuda user.model=/tmp/gemma4"
run() {  # name catalog overrides...
  local name=$1 cat=$2; shift 2
  local t0=$(date +%s.%N)
  python3 cli.py train --config offline --catalog "$cat" --run "/tmp/runs/$name" --json \
      $(for o in $BASE "$@"; do printf -- '--set %s ' "$o"; done) > "/tmp/runs/$name.json" 2> "/tmp/runs/$name.err"
  local rc=$?
  python3 - "$name" "$rc" "$t0" <<'PY' >> "$OUT/gpu_runs.jsonl"
import json, sys, time
name, rc, t0 = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
out = {"name": name, "rc": rc, "seconds": round(time.time() - t0, 1)}
try:
    r = json.load(open(f"/tmp/runs/{name}.json"))
    m = json.load(open(f"/tmp/runs/{name}/metrics.json"))
    out.update(valid=r["valid"], test=r["test_retrieval"], best_epoch=r["best_epoch"], epochs=len(m["history"]))
except Exception as err:
    out["error"] = str(err) + open(f"/tmp/runs/{name}.err").read()[-1500:]
print(json.dumps(out))
PY
  tail -1 "$OUT/gpu_runs.jsonl" | cut -c1-400
}
mkdir -p /tmp/runs
run ml100k_random_posters /tmp/cat/ml100k user.init=random
run ml100k_gemma4_lora_posters /tmp/cat/ml100k user.layer=4 user.strategy=lora
run ml100k_gemma4_frozen_posters /tmp/cat/ml100k user.layer=4 user.strategy=frozen
run ml100k_gemma4_topk2_posters /tmp/cat/ml100k user.layer=4 user.strategy=top_k user.top_k=2
run ml100k_gemma4_full_posters /tmp/cat/ml100k user.layer=4 user.strategy=full train.llm_lr=0.0001
run mlls_random /tmp/cat/mlls user.init=random item.image.enabled=false
run mlls_gemma4_lora /tmp/cat/mlls user.layer=4 user.strategy=lora item.image.enabled=false
cp /tmp/runs/ml100k_gemma4_lora_posters/curves.png "$OUT/ml100k_gemma4_lora_curves.png" 2>/dev/null
echo done
