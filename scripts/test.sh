#!/usr/bin/env bash
# The test suite from a fresh clone: set-up (idempotent), lint, then pytest on two real ComfyUI generations at once:
#   current  ComfyUI v0.28.2 (.venv-current): every test (but the balance_2024 ones), and no test may skip;
#   2024     the embedded March-2024 ComfyUI (.venv): the tests that use ComfyUI (the others run once, on current,
#            except a few heavy ones marked balance_2024, which the 2024 process runs to share the load).
# Arguments select tests in both runs:  bash scripts/test.sh tests/test_wan.py -k stock
# LOFA_RUNTIMES="current" (or "2024") runs one runtime only (then it runs every selected test);
# LOFA_COMFYUI_ROOT=/path/to/ComfyUI runs the "current" tests on that checkout instead (with .venv-current).
# Each pytest process uses OMP_NUM_THREADS threads (default 1: on a small machine two spinning OpenMP pools in
# two processes slow each other down more than one thread each costs).
set -euo pipefail
cd "$(dirname "$0")/.."
read -r -a runtimes <<< "${LOFA_RUNTIMES:-2024 current}"
bash scripts/setup_env.sh "${runtimes[@]}"

venv_of() { if [ "$1" = current ]; then echo .venv-current; else echo .venv; fi; }
"$(venv_of "${runtimes[0]}")/bin/ruff" check .

# Without a test path among the arguments, they apply to the whole suite (e.g. -k, -x, -m).
takes_value=" -k -m -p -o -c -W --ignore --ignore-glob --deselect --basetemp --rootdir --junitxml --maxfail --tb "
has_path=0 previous=""
for arg in "$@"; do
  if [[ $arg != -* && -e ${arg%%::*} && $takes_value != *" $previous "* ]]; then has_path=1; fi
  previous=$arg
done
selection=("$@")
[ $has_path -eq 1 ] || selection=(tests "$@")

logs=.cache/test-logs
mkdir -p "$logs"
# Expensive runtime-independent results (the training suite) are computed once and shared by both processes.
shared=$(mktemp -d "${TMPDIR:-/tmp}/lofa-tests.XXXXXX")
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$shared"' EXIT
threads=${OMP_NUM_THREADS:-1}
declare -A pids
current_root=${LOFA_COMFYUI_ROOT:-.cache/comfyui-current}  # another current ComfyUI checkout, if set
for runtime in "${runtimes[@]}"; do
  settings=(-u LOFA_COMFYUI_ROOT OMP_NUM_THREADS="$threads" LOFA_SHARED_TMP="$shared")
  if [ "$runtime" = current ]; then
    settings+=(LOFA_COMFYUI_ROOT="$current_root" LOFA_NO_SKIPS=1)
  fi
  if [ ${#runtimes[@]} -gt 1 ]; then
    settings+=(LOFA_RUN_PART="$runtime")  # tests that never touch ComfyUI run in one process only
  fi
  echo "pytest on the $runtime ComfyUI: ${selection[*]}   (log: $logs/$runtime.log)"
  env "${settings[@]}" "$(venv_of "$runtime")/bin/python" -m pytest --durations=12 "${selection[@]}" \
    > "$logs/$runtime.log" 2>&1 &
  pids[$runtime]=$!
done

failed=0
for runtime in "${runtimes[@]}"; do
  rc=0
  wait "${pids[$runtime]}" || rc=$?
  echo
  echo "======================== $runtime ComfyUI (exit code $rc) ========================"
  cat "$logs/$runtime.log"
  if [ $rc -eq 5 ]; then
    echo "(no test of this selection runs on the $runtime ComfyUI)"
  elif [ $rc -ne 0 ]; then
    failed=1
  fi
done
exit $failed
