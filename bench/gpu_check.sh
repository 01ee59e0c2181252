#!/usr/bin/env bash
# The GPU check of issue 23: one command, <= 8 minutes on one H100/H200, one JSON report
# (bench/gpu_check.py says what each section proves; docs/gpu.md how to read the report).
#
#   bash bench/gpu_check.sh [REPORT.json] [gpu_check.py options...]
#       REPORT default: $OUT/gpu_check.json when $OUT is set, else ./gpu_check.json
#   bash bench/gpu_check.sh --wheels
#       on a machine with pip access: put the pure-Python packages the GPU image lacks
#       (hydra-core, omegaconf, antlr4, datasets, dill, multiprocess) into .whl/ (ignored
#       by git through .git/info/exclude), at this checkout's versions
#
# On this workplace's lent machine (tool `run`, nvidia-h200: torch, transformers,
# accelerate, sentencepiece, safetensors are in its image; no network), from the repo root:
#   1. here, once:   bash bench/gpu_check.sh --wheels
#   2. run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=560)
#      the report comes back as $OUT/gpu_check.json (the section logs as $OUT/*.log)
# Elsewhere (a GPU box with the project installed: pip install -e '.[test]'):
#   bash bench/gpu_check.sh report.json [--model-dir /path/to/SmolLM2-135M-hf]
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PYTHON=${PYTHON:-python3}
WHEELS=(hydra-core omegaconf antlr4-python3-runtime datasets dill multiprocess)

if [ "${1:-}" = "--wheels" ]; then
    exclude=$(git rev-parse --git-path info/exclude) || exit 2
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
    mkdir -p .whl
    pins=()
    for name in "${WHEELS[@]}"; do  # the versions this checkout is tested with
        version=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('$name'))") || exit 2
        pins+=("$name==$version")
    done
    # the image's python is 3.12 (multiprocess ships one wheel per Python version);
    # antlr4-python3-runtime 4.9.3 (omegaconf's pin) is a source archive only: built here
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 -d .whl "${pins[@]:0:2}" "${pins[@]:3}" || exit 2
    "$PYTHON" -m pip wheel -q --no-deps -w .whl "${pins[2]}" || exit 2
    ls -l .whl
    exit 0
fi

out=""
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then out=$1; shift; fi
out=${out:-${OUT:+$OUT/gpu_check.json}}
out=${out:-gpu_check.json}

export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false \
    PYTHONUNBUFFERED=1
versions="import torch, hydra, omegaconf, datasets, accelerate, sentencepiece, safetensors, transformers
print('torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
if ! "$PYTHON" -c "$versions" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
    # a machine without the project's packages and without a registry: the carried wheels
    site=${TMPDIR:-/tmp}/gqalab-site
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .whl/*.whl || { echo "error: installing .whl/ failed" >&2; exit 2; }
    export PYTHONPATH=$PYTHONPATH:$site  # the wheels are only packages the image lacks
fi
if ! "$PYTHON" -c "$versions"; then
    echo "error: a package gqalab needs is missing: run 'bash bench/gpu_check.sh --wheels' on a machine with pip and carry .whl, or pip install -e '.[test]'" >&2
    exit 2
fi
work=${TMPDIR:-/tmp}/gqalab-gpu-check  # run dirs and checkpoints: not under $OUT
rm -rf "$work"
# the driver stops starting sections at its budget (--budget, default 450 s); this is the
# hard stop for a section that hangs, inside the 8 minutes
timeout -k 10 470 "$PYTHON" -m bench.gpu_check --out "$out" --work "$work" "$@"
status=$?
if [ -n "${OUT:-}" ] && [ -d "$work" ]; then  # the logs come back with the report (8 files at most)
    for log in "$work"/*.log; do [ -f "$log" ] && cp "$log" "$OUT/"; done
fi
exit $status
