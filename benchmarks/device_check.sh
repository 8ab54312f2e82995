#!/usr/bin/env bash
# One prepared run for a lent GPU machine (issue 16: "the same scale run on CUDA, reported beside the CPU figures"):
# the CUDA tests, then benchmarks/scale.py on the GPU (bf16 training, decoding, add/remove) at 10k and 100k images.
# Everything it writes that matters lands in $OUT (the device tool brings that folder back).
#
# The device image has torch, pytest and an older transformers / huggingface_hub; what this project needs beyond it
# travels as wheels in .whl/ (git-ignored through .git/info/exclude), fetched here beforehand with:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     transformers==5.25.0 huggingface_hub==2.5.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
#     faiss-cpu==1.15.1
# and the run:  run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=560)
set -uo pipefail
OUT=${OUT:-/tmp/gcmr-device-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HOME="$(mktemp -d)" THP_MEM_ALLOC_ENABLE=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
{ nvidia-smi; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__,
  torch.cuda.get_device_name(0))"; } 2>&1 | tee "$OUT/device.txt"

# The tests that need a GPU (they skip on CI's machines).
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    "tests/test_prefix_trie_logits_processor.py::test_cuda_matches_cpu" 2>&1 | tee "$OUT/cuda_tests.log"

# The scale path on the GPU; its own section of docs/benchmarks.md and docs/scale_cuda.png come back in $OUT.
timeout 360 python3 benchmarks/scale.py --device cuda --bf16 --sizes 10000,100000 --id_types coarse_fine \
    --max_train_steps 200 --rss_limit_gb 100 --work /tmp/gcmr-scale-work 2>&1 | tee "$OUT/scale_cuda.log"
mkdir -p "$OUT/scale_cuda"
cp benchmarks/results/scale_cuda/*.json "$OUT/scale_cuda/" 2>/dev/null
cp docs/benchmarks.md docs/scale_cuda.png "$OUT/" 2>/dev/null
exit 0
