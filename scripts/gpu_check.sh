#!/usr/bin/env bash
# The GPU checks, for a machine with a CUDA device (issue 17): one summary line per check, under 8 minutes.
#
#   scripts/gpu_check.sh                 # from the repository root
#
# 1. device paths: tests/gpu (build, generate, serve, eval and train in bf16 / fp16 on CUDA, each compared
#    with the CPU) and the other tests marked `gpu`;
# 2. TensorRT export: tests/export/test_export_tensorrt.py (skips, saying why, without torch_tensorrt);
# 3. bf16 decode benchmark: bench/forward.py on CUDA in bf16 against transformers' Llava in the same process
#    (appends its line to bench/RESULTS.md).
#
# Python: $PYTHON, else .venv/bin/python, else python3. On a machine without this project's dependencies,
# put their wheels in .whl/ (lark, pydantic, pydantic-core, annotated-types, typing-inspection, starlette,
# uvicorn, and the pinned transformers if the machine's differs); they are installed into /tmp/site first.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
LOG=${OUT:-/tmp}/gpu_check.log
: >"$LOG"
status=0

check() {  # check NAME LIMIT_S COMMAND...: runs it, prints "NAME: PASS|FAIL (seconds) last line"
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS out rc
  out=$(timeout "$limit" "$@" 2>&1)
  rc=$?
  printf '### %s\n%s\n' "$name" "$out" >>"$LOG"
  local last
  last=$(printf '%s\n' "$out" | grep -v '^\s*$' | tail -n 1)
  if [ $rc -eq 0 ]; then
    printf '%-22s PASS (%3ds) %s\n' "$name:" $((SECONDS - t0)) "$last"
  else
    printf '%-22s FAIL (%3ds, exit %d) %s\n' "$name:" $((SECONDS - t0)) $rc "$last"
    status=1
  fi
}

"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")'
check "device paths" 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/gpu
check "TensorRT export" 150 "$PY" -m pytest -q -p no:cacheprovider -rs tests/export/test_export_tensorrt.py
check "bf16 decode bench" 90 "$PY" bench/forward.py --device cuda --dtype bf16 --batch 8 --new-tokens 64 --repeats 5
echo "full output: $LOG"
exit $status
