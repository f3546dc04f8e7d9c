#!/usr/bin/env bash
# GPU checks on the lent device machine (Python 3.12, torch 2.11, transformers 5.17; no polars, faiss, open_clip
# or soundfile there). Run from the repo root after the wheels were installed into /tmp/site (see README):
#   .whl1/ (polars runtime, installed by a first call) and .whl2/ (the rest) are cp312 wheels; .gpu/ holds the
#   datasets the tests read and the towerrec model cache (random tiny presets), all ignored by git.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl2/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOWERREC_CACHE=$PWD/.gpu/cache
mkdir -p ../shared/datasets && cp -r .gpu/datasets/* ../shared/datasets/
nvidia-smi -L
python3 -c "import torch, transformers, polars, faiss; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
OUT=${OUT:-/tmp/out}
# 1. the gpu-marked tests and the reranker on this transformers version (the 5.17 cache-API crash)
python3 -m pytest -q -p no:cacheprovider -m gpu tests/train/test_device.py 2>&1 | tee "$OUT/gpu_tests.log"
python3 -m pytest -q -p no:cacheprovider tests/towers/test_rerank.py tests/train/test_device.py tests/index \
    tests/train/test_prompts.py tests/train/test_losses.py 2>&1 | tee "$OUT/cpu_side_tests.log" | tail -15
