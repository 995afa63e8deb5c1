#!/usr/bin/env bash
# Everything this project checks and times on one lent GPU, in as few calls as possible.
#
#   bash benchmarks/gpu_session.sh bench   # step_throughput (base, maskvlm vs FLAVA, batch 128) + gpu_step
#                                          # (every variant at 64; compile and CUDA graphs at 256) +
#                                          # host_overhead (host cost per step, vs FLAVA) +
#                                          # ITM re-ranking at base (text step once per caption,
#                                          # head-layout key/value gather). About 20 min in all:
#                                          # split it over device calls with
#                                          # ONLY="step_base gpu_step_64" bash ... bench, then
#                                          # ONLY="gpu_step_256 host_cost rerank_base" bash ... bench
#   bash benchmarks/gpu_session.sh train   # host-device syncs in a step (gpu_profile); tests/train/test_gpu.py
#                                          # (no syncs; compiled and CUDA-graph stacks = eager); the trainer on
#                                          # CUDA: main job (and its model's re-ranking, each distinct
#                                          # pair once vs directions apart), NCCL/DDP, FSDP + resume,
#                                          # shards, torch.compile; data_throughput against the GPU rate
#                                          # (and reduced vs full JPEG decoding per worker);
#                                          # index build with decoding workers; accumulated ITC. More
#                                          # than one 10-minute device call: split it with ONLY= too
#
# Reports and logs go to $OUT (or runs/gpu-session). Each step has its own time limit and a
# failing step does not stop the others; the exit status counts the failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-session}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
fails=0
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, record the outcome
    local name=$1 limit=$2; shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi  # ONLY="a b": just those steps
    local t0=$SECONDS
    echo "=== $name: $*" | tee -a "$OUT/summary.txt"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
    tail -n 25 "$OUT/$name.log"
    [ $rc -eq 0 ] || fails=$((fails + 1))
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/summary.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/summary.txt"
M="python3 -m maskvlm"

case "${1:-bench}" in
bench)
    step step_base 240 python3 benchmarks/step_throughput.py --preset base --device cuda --dtypes bf16 \
        --batch-size 128 --warmup 5 --repeats 20
    step gpu_step_64 400 python3 benchmarks/gpu_step.py --batch-size 64 --warmup 5 --repeats 20
    step gpu_step_256 400 python3 benchmarks/gpu_step.py --batch-size 256 --warmup 5 --repeats 10 \
        --only default "+ torch.compile" "+ torch.compile, CUDA graphs"
    step host_cost 240 python3 benchmarks/host_overhead.py --device cuda --top 12
    step rerank_base 420 python3 benchmarks/retrieval_eval.py --preset base --device cuda --sizes 1000 \
        --ks 16 128 --compare-text-per-pair --compare-gathered-kv --compare-compiled --repeats 3
    ;;
train)
    R=runs/gpu
    step sync_check 120 python3 benchmarks/gpu_profile.py --rows 12
    step gpu_tests 300 python3 -m pytest -q -p no:cacheprovider tests/train/test_gpu.py
    step main_job 200 $M pretrain --output-dir $R/main --no-progress
    step rerank_trained 150 python3 benchmarks/retrieval_eval.py --checkpoint $R/main/best --device cuda \
        --sizes 1000 --ks 16 128 --full-rerank --compare-directions-apart --repeats 3
    step ddp_nccl 90 torchrun --standalone --nproc-per-node 1 -m maskvlm pretrain --data data/synthetic/train.json \
        --test-data data/synthetic/test.json --output-dir $R/ddp --steps 30 --no-progress
    step fsdp 90 torchrun --standalone --nproc-per-node 1 -m maskvlm pretrain --data data/synthetic/train.json \
        --test-data data/synthetic/test.json --output-dir $R/fsdp --steps 20 --no-progress train.fsdp=true \
        train.save_every=10
    step fsdp_resume 90 torchrun --standalone --nproc-per-node 1 -m maskvlm pretrain --output-dir $R/fsdp \
        --resume auto --no-progress train.max_steps=30
    step shards 90 bash -c "$M data shard --data data/synthetic/train.json --out $R/shards --shard-size 500 && \
        $M pretrain --shards '$R/shards/*.tar' --test-data data/synthetic/test.json --output-dir $R/stream \
        --steps 30 --no-progress data.num_workers=2"
    step compile 150 $M pretrain --data data/synthetic/train.json --output-dir $R/compile --steps 30 --no-progress \
        train.compile=true
    step data_base 150 python3 benchmarks/data_throughput.py --presets base --device cuda --workers 1 4 8 \
        --samples 1500 --work $R/data-bench
    step data_decode 150 python3 benchmarks/data_throughput.py --presets base --device cuda --workers 1 \
        --sources 512 1024 --decode reduced full --samples 800 --work $R/data-bench
    step index_workers 150 python3 benchmarks/index_build.py --preset base --device cuda --side 256 \
        --workers 0 4 8 --work $R/index-bench
    step accumulate_itc 120 $M pretrain --data data/synthetic/train.json --output-dir $R/accum --steps 30 \
        --no-progress train.batch_size=32 train.grad_accum=2 train.accumulate_itc=true
    ;;
*) echo "usage: $0 bench|train" >&2; exit 2 ;;
esac
echo "failed steps: $fails" | tee -a "$OUT/summary.txt"
exit $fails
