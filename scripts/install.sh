#!/usr/bin/env bash
# Create/refresh the project virtualenv and install lightning-gfm in editable mode.
#
# Usage: scripts/install.sh [EXTRAS]      e.g.  dev | wandb | dev,wandb   (default: none)
#
# Environment:
#   PYTHON         interpreter used to create the venv      (default: python3)
#   GFM_VENV       venv location                             (default: <repo>/.venv)
#   GFM_CPU_TORCH  torch version installed on CPU-only hosts (default: 2.13.0, as <ver>+cpu)
#
# torch policy: an importable torch already in the venv is kept; otherwise a CUDA host
# (nvidia-smi works) gets the default `torch` wheel and a CPU-only host gets <ver>+cpu.
# The resulting version is pinned in $GFM_VENV/gfm-constraints.txt and passed with -c to every
# later pip call, so no dependency can swap it for another build.
# torchdyn is installed with --no-deps: its declared requirements (torchvision, jupyter, ...)
# would otherwise drag in a CUDA torch. What it really imports is in pyproject's dependencies.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT="$ROOT/scripts/install.sh"
cd "$ROOT"

PY="${PYTHON:-python3}"
VENV="$(realpath -m "${GFM_VENV:-$ROOT/.venv}")"   # relative paths are relative to the repo root
EXTRAS="${1:-}"
CPU_TORCH="${GFM_CPU_TORCH:-2.13.0}"
TORCHDYN="torchdyn==1.0.6"
CPU_INDEX="https://download.pytorch.org/whl/cpu"

log() { echo "install.sh: $*"; }

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating venv at $VENV"
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
CONSTRAINTS="$VENV/gfm-constraints.txt"
tag="${EXTRAS:-base}"
STAMP="$VENV/.gfm-install-${tag//[^A-Za-z0-9_.-]/_}.stamp"

pip_q() { "$VPY" -m pip install -q "$@"; }

# ---- fast path: nothing changed since the last successful run ---------------------------------
want="$(cat "$ROOT/pyproject.toml" "$SCRIPT" <(echo "extras=$EXTRAS root=$ROOT") | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -f "$CONSTRAINTS" ]]; then
    # Cheap sanity check (no `import torch`): packages present and torch still the pinned one.
    # Run from / so the checkout itself (cwd on sys.path) cannot satisfy the lightning_gfm lookup.
    if have="$(cd / && "$VPY" - "$CONSTRAINTS" <<'PYEOF'
import importlib.metadata as md, importlib.util as iu, sys
pin = open(sys.argv[1]).read().split("==", 1)[1].strip()
ok = all(iu.find_spec(m) for m in ("torch", "torchdyn", "lightning", "lightning_gfm"))
ver = md.version("torch") if ok else ""
if not ok or ver != pin:
    sys.exit(1)
print(ver)
PYEOF
    )"; then
        log "up to date; keeping torch $have ($VENV)"
        exit 0
    fi
fi

# ---- torch ------------------------------------------------------------------------------------
torch_version() { "$VPY" -c 'import importlib.metadata as m; print(m.version("torch"))'; }

if "$VPY" -c 'import torch' >/dev/null 2>&1; then
    action="kept existing"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip_q torch
    action="installed (CUDA host)"
else
    extra=()
    if timeout 10 "$VPY" - "$CPU_INDEX/torch/" >/dev/null 2>&1 <<'PYEOF'; then
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=5).close()
PYEOF
        extra=(--extra-index-url "$CPU_INDEX")
    fi
    if ! pip_q "torch==${CPU_TORCH}+cpu" ${extra[@]+"${extra[@]}"}; then
        log "ERROR: could not install torch==${CPU_TORCH}+cpu (no local wheel and $CPU_INDEX unreachable?)." >&2
        log "Install a CPU torch into $VENV yourself and re-run; it will be kept." >&2
        exit 1
    fi
    action="installed (CPU-only host)"
fi
tv="$(torch_version)"
echo "torch==$tv" >"$CONSTRAINTS"
log "$action torch $tv; pinned in $CONSTRAINTS"

# ---- project + torchdyn -----------------------------------------------------------------------
target="."
[[ -n "$EXTRAS" ]] && target=".[$EXTRAS]"
pip_q -c "$CONSTRAINTS" -e "$target"
# After the editable install on purpose: pip only skips its dependency-conflict report
# (torchdyn "requires torchvision ...") for --no-deps installs.
pip_q -c "$CONSTRAINTS" --no-deps "$TORCHDYN"

echo "$want" >"$STAMP"
