#!/usr/bin/env bash
# `make gpu-rehearsal OUT=DIR`: run the device entry point (bench/device/run.sh) here, as the lent GPU
# machine would, in a simulated device environment:
#   - python3 is a Python 3.12 venv holding only packages of the device image, at its versions where
#     KINDS.md gives them (bench/device/sim.txt, every pin checked against bench/device/image.txt);
#     built once from PyPI into $SIM (git-ignored) and reused while sim.txt is unchanged;
#   - the environment is emptied (no .venv, no PYTHONPATH, no pip configuration, no CUDA device);
#   - no registry: the run is in a network namespace of its own with only the loopback up (unshare -n),
#     where this machine allows one, and pip is told --no-index either way.
# Every step then gets through its imports and set-up and records `skipped: no CUDA` in DIR/gpu-check.json.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${OUT:?OUT=DIR: where gpu-check.json and the log go}"
SIM="${SIM:-$ROOT/.gpu-sim}"
CARRY="${CARRY:-$ROOT/.gpu-carry}"
REQS="$ROOT/bench/device/sim.txt"

find_python312() {
  # python3.12 on PATH, else a pyenv install (pyenv's shim exists but refuses while 3.12 is not selected)
  if [ -n "${PYTHON312:-}" ]; then echo "$PYTHON312"; return; fi
  if python3.12 -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    command -v python3.12; return
  fi
  local root
  root="$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"
  for p in "$root"/versions/3.12*/bin/python3.12; do
    if [ -x "$p" ]; then echo "$p"; return; fi
  done
  echo "gpu-rehearsal: no Python 3.12 here (the device runs 3.12 and the carried wheels are cp312);" \
    "install one (pyenv install 3.12) or name it with PYTHON312=/path/to/python3.12" >&2
  exit 2
}

build_sim() {
  local stamp want
  want="$(sha256sum "$REQS" | cut -c1-16)"
  stamp="$SIM/.built-$want"
  if [ -f "$stamp" ]; then return; fi
  local py312 start
  py312="$(find_python312)"
  start=$(date +%s)
  echo "gpu-rehearsal: building the simulated device environment in $SIM ($py312, bench/device/sim.txt)"
  rm -rf "$SIM"
  "$py312" -m venv "$SIM"
  # exact pins, no dependency resolution: the env holds what sim.txt names and nothing else
  PIP_CONSTRAINT="" PIP_FIND_LINKS="" "$SIM/bin/python" -m pip install -q --disable-pip-version-check \
    --no-deps --only-binary=:all: -r "$REQS"
  "$SIM/bin/python" -m pip check
  echo "gpu-rehearsal: built in $(( $(date +%s) - start )) s, $(du -sh "$SIM" | cut -f1)"
  touch "$stamp"
}

build_sim
"$SIM/bin/python" "$ROOT/bench/device/wheels.py" --check-sim "$SIM/bin/python"
[ -d "$CARRY/wheels" ] || { echo "gpu-rehearsal: $CARRY/wheels is missing: run make gpu-wheels" >&2; exit 2; }

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
run=(env -i "PATH=$SIM/bin:/usr/bin:/bin" "HOME=${TMPDIR:-/tmp}" "OUT=$OUT" "CUDA_VISIBLE_DEVICES="
  "PIP_NO_INDEX=1" "PIP_CONFIG_FILE=/dev/null" "SAK_CARRY=$CARRY" "LANG=C.UTF-8" "SAK_GPU_EXPECT_SKIPPED=1"
  ${SAK_GPU_STEPS:+"SAK_GPU_STEPS=$SAK_GPU_STEPS"} bash "$ROOT/bench/device/run.sh")
cd "$ROOT"
if [ "${SAK_REHEARSAL_NET:-}" != "keep" ] && unshare -n true 2>/dev/null; then
  echo "gpu-rehearsal: no network (own network namespace, loopback only)"
  # "$@" of the inner shell is the run command; the loopback is brought up first (Ray binds 127.0.0.1)
  exec unshare -n bash -c 'ip link set lo up && exec "$@"' rehearsal "${run[@]}"
fi
echo "gpu-rehearsal: unshare -n is not allowed here; the run is kept off registries by PIP_NO_INDEX only"
exec "${run[@]}"
