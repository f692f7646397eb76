#!/usr/bin/env bash
# The GPU half of the vLLM engine in one call on a lent GPU machine: what CI (CPU) cannot run.
#
# After the kit's install calls (bash .ci/gpu_kit.sh here; docs/vllm.md#gpu-check has the calls), the last call:
#     python3 .gpu/3/install.py && bash .ci/gpu_check.sh
# It installs this checkout into the kit's /tmp/site, then runs, each under its own time limit and whatever the
# others did: the `gpu` tests (bf16 kernels, sleep mode level 2 and reload from buckets, CUDA IPC), the rollout
# bench against bare vLLM, and a 2-step colocated run (sleep / wake, CUDA IPC weight sync). Logs and a summary go
# to $OUT (the device tool's folder; /tmp/gpu-check elsewhere). About 9 minutes at most.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA GPU here')" || exit 2
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export VLLM_USE_FLASHINFER_SAMPLER=0  # the kit does not carry flashinfer
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site . >"$OUT/install.log" 2>&1 \
  || { tail -n 20 "$OUT/install.log"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/summary.txt"
python3 -c "import torch, vllm, ray, deepspeed, transformers as t; print('torch', torch.__version__, 'vllm', \
vllm.__version__, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__, 'transformers', t.__version__)" \
  2>/dev/null | tee -a "$OUT/summary.txt"

step() {  # NAME SECONDS COMMAND...: run it with a time limit, log it, one summary line
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - start)) s (limit $limit)" | tee -a "$OUT/summary.txt"
  tail -n 8 "$OUT/$name.log"
}

# the CLI runs: a small toy world (the tests build their own), bf16 as on GPUs, vLLM, one worker
RUN=(toy_world.root=/tmp/gpu-check-toy toy_world.train_per_task=16 toy_world.eval_per_task=4 toy_world.sft_steps=40
     toy_world.sft_batch_size=8 model.dtype=bfloat16 rollout.engine=vllm rollout.num_workers=1)
step gpu_tests 220 python3 -m pytest -q -p no:cacheprovider -m gpu tests/rollout/test_vllm_gpu.py
step bench_rollout 170 morl bench rollout recipes/quickstart.yaml "${RUN[@]}" --steps 0 --rounds 3
# eager: this run checks sleep / wake and the CUDA IPC sync, not speed, and CUDA graphs would take a minute to start
step train_colocated 150 morl train recipes/quickstart.yaml "${RUN[@]}" rollout.colocate=true \
  rollout.enforce_eager=true trainer.max_steps=2 trainer.prompts_per_step=8 eval.max_prompts_per_task=4 \
  -o /tmp/gpu-check-run
cp /tmp/gpu-check-run/metrics.jsonl "$OUT/train_metrics.jsonl" 2>/dev/null
cat "$OUT/summary.txt"
