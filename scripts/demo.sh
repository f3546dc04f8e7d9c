#!/usr/bin/env bash
# The main job: MovieLens-100K (+ TMDB overviews and posters) -> train -> index -> query -> evaluate.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
RUNS=${RUNS:-runs}
DATA=${TOWERREC_ML100K:-../shared/datasets/movielens-100k-mm}
CONFIG=${DEMO_CONFIG:-demo}
if [ ! -f "$DATA/u.data" ]; then
  echo "MovieLens-100K not found at $DATA: download ml-100k from grouplens.org (plus TMDB overviews/posters, optional) and set TOWERREC_ML100K=/path/to/it" >&2
  exit 2
fi
start=$(date +%s)
cli() { "$PY" cli.py "$@"; }
cli prepare --format movielens-100k --src "$DATA" --out "$RUNS/ml100k/catalog"
cli train --config "$CONFIG" --catalog "$RUNS/ml100k/catalog" --run "$RUNS/ml100k/run" --overwrite --quiet ${TRAIN_ARGS:-}
cli build-index --run "$RUNS/ml100k/run" --quiet
echo "== sample user =="
cli query --run "$RUNS/ml100k/run" --user "${DEMO_USER:-1}" -k 10 --rerank on
echo "== retrieval, all users (full ranking, history excluded) =="
cli evaluate --run "$RUNS/ml100k/run" --rerank off --json --quiet
echo "== LLM rerank of the top 20, seeded sample of ${DEMO_USERS:-10} users ('evaluate' without --users scores all) =="
cli evaluate --run "$RUNS/ml100k/run" --users "${DEMO_USERS:-10}" --json --quiet
echo "demo wall time: $(( $(date +%s) - start ))s"
