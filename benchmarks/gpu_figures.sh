#!/usr/bin/env bash
# Every GPU check and figure that BENCHMARKS.md still lacks, in one command, on a machine with a
# CUDA device (none was lent to the sessions that wrote this project, so these are unmeasured):
#
#   benchmarks/gpu_figures.sh [OUT_DIR]        (default: gpu-figures/; run from the repository root)
#
# 1. the GPU tests (`pytest -m gpu`): CUDA extraction against the CPU, every detector trained on
#    CUDA, a whole run on CUDA, TV-L1 on CUDA eager and compiled, MIST's mixed-precision step;
# 2. extraction (issue 3): clips/s, decode vs compute, achieved FLOP/s as a share of the bf16 peak,
#    per backbone whose weights are cached (put resnet50_i3d / c3d_fc6 weights in the cache first:
#    the GPU machines cannot download them);
# 3. training (issue 4): RTFM and every other detector on UCF-Crime-sized features, with the
#    estimate of the full schedule (goal: RTFM's 15,000 iterations under 10 minutes);
# 4. TV-L1 (issue 7): OpenCV on the CPU against the PyTorch TV-L1 on the GPU, eager and compiled
#    (goal: 50x OpenCV at 320x240), against OpenCV on one thread and on every core;
# 5. the decode feed (extract.decode_workers): the real networks in bf16 fed by 1, 4 and all-but-one
#    decode workers, achieved FLOP/s as a share of the bf16 peak and the share of time the network
#    waited for decoded clips (benchmarks/roofline_feed.py --real; random weights: same FLOPs), and
#    the paced stand-in on this host's cores (frames/s, stall share, cores needed).
# Each part's output goes to OUT_DIR/<part>.txt (and .json where the script writes one); a failing
# part does not stop the others. Copy the tables into BENCHMARKS.md with the machine and the date.
set -uo pipefail
out=${1:-gpu-figures}
mkdir -p "$out"
py=${PYTHON:-python}
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA device: nothing to measure" >&2
    exit 2
fi
"$py" -c 'import torch; print(torch.cuda.get_device_name(), torch.__version__)' | tee "$out/device.txt"
status=0
run() {  # run NAME COMMAND...: tee the output, remember a failure, go on
    local name=$1; shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "== $name failed (exit $rc)"; status=1; }
}
run pytest_gpu "$py" -m pytest -q -m gpu -rs
run extract "$py" benchmarks/extract.py --device cuda --precision bf16 --clips 128
run extract_fp32 "$py" benchmarks/extract.py --device cuda --precision fp32 --no-preprocessing --clips 128
run train "$py" benchmarks/train.py --device cuda --steps 50 --warmup 5 --json "$out/train.json"
# OpenCV with one thread (BENCHMARKS.md's baseline) and with every core (the harder one)
run flow_1thread "$py" benchmarks/flow.py --no-cpu-torch --compile --threads 1
run flow_allthreads "$py" benchmarks/flow.py --no-cpu-torch --compile --threads "$(nproc)"
cores=$("$py" -c 'import os; print(len(os.sched_getaffinity(0)))')
feed_workers="1 4 $((cores > 2 ? cores - 1 : 2))"
run roofline_feed_real "$py" benchmarks/roofline_feed.py --real --device cuda --no-gil --workers $feed_workers \
    --frames 1800 --synthetic 8 --json "$out/roofline_feed_real.json"
run roofline_feed_paced "$py" benchmarks/roofline_feed.py --workers $feed_workers --frames 1800 --synthetic 8 \
    --gpu H100 --json "$out/roofline_feed_paced.json"
exit $status
