#!/usr/bin/env bash
# Correctness and reproducibility on an accelerator, in one command:
#
#     bash benchmarks/gpu_checks.sh OUTDIR [SECONDS]
#
# 1. The official-parity and lowering tests (tests/test_{condense,torch_import,models,layers}.py),
#    in true float32 (the tests' conftest asks for it; JAX's default precision would use TF32).
#    Point CONDENSENET_FIXTURES at the official fixtures.
# 2. The digits quick start for 4 epochs, twice with config.deterministic on and twice with it
#    off, all at once; prints whether each pair ends with the same final_state_sha256.
#
# Everything runs within SECONDS (default 300). Logs and summaries go to OUTDIR; the last lines
# printed are the summary table.
set -u
out=${1:?usage: bash benchmarks/gpu_checks.sh OUTDIR [SECONDS]}
seconds=${2:-300}
python=${PYTHON:-python3}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several processes share the device
workers=()
command -v nproc >/dev/null && [ "$(nproc)" -ge 8 ] && \
  "$python" -c 'import xdist' 2>/dev/null && workers=(-n 4)

tests=(tests/test_condense.py tests/test_torch_import.py tests/test_models.py tests/test_layers.py)
timeout "$seconds" "$python" -m pytest -q "${workers[@]}" "${tests[@]}" >"$out/parity.log" 2>&1 &
for run in det_a det_b nondet_a nondet_b; do
  deterministic=$([ "${run%_*}" = det ] && echo true || echo false)
  timeout "$seconds" "$python" train.py --config configs/digits.py --workdir "$out/$run" \
    --config.num_epochs=4 --config.deterministic=$deterministic \
    >"$out/$run.log" 2>&1 &
done
wait

echo '| check | result |'
echo '|---|---|'
echo "| parity tests (float32) | $(grep -E '(passed|failed|error)' "$out/parity.log" | tail -1) |"
sha() {
  "$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["final_state_sha256"])' \
    "$out/$1/summary.json" 2>/dev/null || echo "no summary (see $1.log)"
}
for kind in det nondet; do
  a=$(sha ${kind}_a); b=$(sha ${kind}_b)
  verdict=$([ "$a" = "$b" ] && echo identical || echo differ)
  echo "| digits 4 epochs twice, deterministic=$([ $kind = det ] && echo true || echo false) |" \
    "$verdict: ${a:0:16} / ${b:0:16} |"
done
grep -E '^(FAILED|ERROR)' "$out/parity.log" | head -20
