#!/usr/bin/env bash
# The device entry point: on the lent GPU machine, from the repository root of the copy the device tool sent,
#     bash bench/device/run.sh
# with the machine's own python3 and nothing else (no registry, no .venv, no .git). It hands over to
# bench/gpu_check.py, which links the package (no install), installs the carried wheels (.gpu-carry/wheels,
# made by `make gpu-wheels`) offline into a scratch folder, probes the machine and runs the steps.
# Everything it prints also goes to $OUT/gpu-check.log; the figures go to $OUT/gpu-check.json and .md,
# rewritten after every step and row. `make gpu-rehearsal` runs this same file here (bench/device/rehearsal.sh).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
: "${OUT:?OUT is not set: the device tool sets it; here, make gpu-rehearsal OUT=DIR}"
mkdir -p "$OUT"
export SAK_CARRY="${SAK_CARRY:-$ROOT/.gpu-carry}"
export PYTHONUNBUFFERED=1

{
  echo "gpu-check on $(hostname) at $(date -u +%FT%TZ): $(command -v python3) ($(python3 --version 2>&1))"
  python3 bench/gpu_check.py --out "$OUT" --carry "$SAK_CARRY" ${SAK_GPU_EXPECT_SKIPPED:+--expect-skipped}
  rc=$?
  echo "gpu-check: exit $rc"
  exit $rc
} 2>&1 | tee -a "$OUT/gpu-check.log"
exit "${PIPESTATUS[0]}"
