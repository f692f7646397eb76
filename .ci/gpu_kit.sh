#!/usr/bin/env bash
# Pack the GPU machine's install kit with the vLLM this project needs (0.32) instead of the shared kit's 0.24.
#
#   bash .ci/gpu_kit.sh            # -> .gpu/1, .gpu/2, ... : carry one per `run` call, then .ci/gpu_check.sh
#
# The shared kit (../shared/gpu, or GPU_KIT=path) packs vLLM, Ray, DeepSpeed and math-verify for the GPU image
# (Python 3.12, torch 2.11.0+cu130, transformers 5.17). This copies it to .gpu-kit/, changes its vLLM pin to
# 0.32.0 and drops the 0.32 wheel's members that a dense model on Hopper never loads (FA2, the MoE kernels,
# DeepGEMM, vllm-rs, the Blackwell FMHA), then packs. Checked on the CPU machine (docs/vllm.md#gpu-check): vLLM
# 0.32's kernels load and register their ops under torch 2.11, and its engine modules import beside the image's
# packages and the kit's pins. Both output folders are ignored by git here.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${GPU_KIT:-../shared/gpu}
[ -f "$KIT/pack.sh" ] || { echo "error: no gpu-kit at $KIT (set GPU_KIT=path/to/shared/gpu)" >&2; exit 2; }
if [ -e .gpu-kit ] && [ ! -f .gpu-kit/.made-by-morl ]; then
  echo "error: .gpu-kit exists and was not made by this script; move it away first" >&2; exit 2
fi
for ignored in /.gpu-kit/ /.gpu/; do
  grep -qxF "$ignored" .git/info/exclude 2>/dev/null || echo "$ignored" >> .git/info/exclude
done
rm -rf .gpu-kit && cp -r "$KIT" .gpu-kit && touch .gpu-kit/.made-by-morl
python3 - .gpu-kit/pack.sh <<'PY'
import sys
path = sys.argv[1]
text = open(path).read()
edits = [
    ('big_wheel("vllm==0.24.0"', 'big_wheel("vllm==0.32.0"'),
    ('RECIPE = "gpu-kit-1"', 'RECIPE = "gpu-kit-1-morl-vllm032"'),
    ('"vllm/third_party/fmha_sm100/",',
     '"vllm/third_party/fmha_sm100/", "vllm/third_party/deep_gemm/_C_extension.abi3.so",'),
]
for old, new in edits:
    if text.count(old) != 1:
        sys.exit(f"error: the shared kit changed: {old!r} is not in {path} exactly once; update .ci/gpu_kit.sh")
    text = text.replace(old, new)
open(path, "w").write(text)
PY
bash .gpu-kit/pack.sh .gpu
