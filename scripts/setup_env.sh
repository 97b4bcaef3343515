#!/usr/bin/env bash
# Idempotent set-up of the test/demo runtimes. Each runtime is a ComfyUI root plus its own virtualenv:
#   2024     .venv          requirements/lock.txt          .cache/comfyui-2024     (the embedded March-2024 ComfyUI)
#   current  .venv-current  requirements/lock-current.txt  .cache/comfyui-current  (ComfyUI v0.28.2)
# Usage: bash scripts/setup_env.sh [2024] [current]    (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."

python_bin="${PYTHON:-}"
if [ -z "$python_bin" ]; then
  for candidate in python3.11 python3.12 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python_bin="$candidate"; break; fi
  done
fi
"$python_bin" -c 'import sys; assert sys.version_info >= (3, 10), "Python 3.10+ is required"'

# install_lock VENV LOCK [NODEPS_LOCK]: create VENV once; (re)install when a lock file changed since last time.
install_lock() {
  local venv=$1 lock=$2 nodeps=${3:-}
  if [ ! -x "$venv/bin/python" ]; then
    echo "creating $venv with $("$python_bin" --version)"
    "$python_bin" -m venv "$venv"
  fi
  local stamp="$venv/.lofa-installed" wanted
  wanted=$(cat "$lock" ${nodeps:+"$nodeps"})
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
    echo "installing pinned packages ($lock${nodeps:+ + $nodeps}) into $venv ..."
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$lock"
    if [ -n "$nodeps" ]; then
      "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$nodeps"
    fi
    printf '%s' "$wanted" > "$stamp"
  fi
}

# setup_runtime NAME: the virtualenv and the ComfyUI root of one runtime.
setup_runtime() {
  case "$1" in
    2024)
      install_lock .venv requirements/lock.txt
      .venv/bin/python scripts/fetch_comfyui.py 2024 >/dev/null
      ;;
    current)
      install_lock .venv-current requirements/lock-current.txt requirements/lock-current-nodeps.txt
      site=$(.venv-current/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
      # torchaudio without its compiled libraries imports as pure Python (its loader skips missing ones).
      rm -f "$site"/torchaudio/lib/*.so
      # torchvision imports once its two op schemas are declared (see scripts/torchvision_op_schemas.py).
      cp scripts/torchvision_op_schemas.py "$site/lofa_torchvision_op_schemas.py"
      echo "import lofa_torchvision_op_schemas" > "$site/lofa_torchvision_op_schemas.pth"
      .venv-current/bin/python scripts/fetch_comfyui.py current >/dev/null
      ;;
    *) echo "unknown runtime '$1' (use 2024 and/or current)" >&2; return 2 ;;
  esac
}

runtimes=("$@")
[ ${#runtimes[@]} -eq 0 ] && runtimes=(2024 current)
pids=()
for runtime in "${runtimes[@]}"; do  # the runtimes are independent: set them up side by side
  setup_runtime "$runtime" &
  pids+=($!)
done
for pid in "${pids[@]}"; do
  wait "$pid"
done
