#!/usr/bin/env bash
# GPU check of lightning-gfm: CUDA tests, Lightning runs on one GPU, forecast throughput (10M / 100M / 1B) and
# snapshot overhead, written to benchmarks/results/gpu/. Finishes within 10 minutes (the Python side stops starting
# phases after --time-limit seconds; `timeout` is the backstop). Extra arguments go to benchmarks/gpu_check.py.
#   bash benchmarks/gpu_check.sh                 # on a machine with an NVIDIA GPU
#   bash benchmarks/gpu_check.sh --dry-run       # anywhere: CPU, tiny sizes
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -f .venv/bin/activate && -z "${VIRTUAL_ENV:-}" ]]; then
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
if [[ " $* " != *" --dry-run "* ]] && ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: torch sees no CUDA device here; run on a GPU machine or pass --dry-run." >&2
  exit 2
fi
exec timeout --signal=TERM --kill-after=15 585 python -m benchmarks.gpu_check --time-limit 480 "$@"
