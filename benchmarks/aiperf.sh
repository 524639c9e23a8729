#!/usr/bin/env bash
# The standard workload's shape through NVIDIA AIPerf (the `bench` extra: pip install -e ".[bench]"),
# against a server that already runs (e.g. `serve run serve_configs/qwen3.yaml`), so our online numbers
# compare with what other servers publish with the same tool. bench.py --http stays the reference
# (exactly the standard workload's 256 prompts); AIPerf draws its own synthetic prompts: lengths
# normal with the mean and spread of uniform(100, 1024) (562, 267), clipped by AIPerf, so its
# totals differ a little from bench.py's 133,966 output tokens. Token counts are the server's (usage), as
# its detokenized random-weight text does not re-tokenize to the same count.
#
#   bash benchmarks/aiperf.sh MODEL_DIR [URL] [SERVED_NAME]      e.g. /tmp/q06 http://127.0.0.1:8000
# Artifacts (profile_export_aiperf.json/.csv: throughput, TTFT, ITL percentiles) in $AIPERF_OUT.
set -euo pipefail
MODEL_DIR=${1:?model folder (its tokenizer counts the tokens)}
URL=${2:-http://127.0.0.1:8000}
NAME=${3:-$(curl -s "$URL/v1/models" | python -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')}
N=${NUM_REQUESTS:-256}
aiperf profile \
  --model "$NAME" --url "$URL" --endpoint-type completions --streaming \
  --tokenizer "$MODEL_DIR" \
  --prompt-input-tokens-mean 562 --prompt-input-tokens-stddev 267 \
  --prompt-output-tokens-mean 562 --prompt-output-tokens-stddev 267 \
  --extra-inputs ignore_eos:true --extra-inputs temperature:0.6 \
  --concurrency "$N" --request-count "$N" --random-seed 0 \
  --use-server-token-count --warmup-request-count 1 --ui-type none \
  --output-artifact-dir "${AIPERF_OUT:-/tmp/aiperf}" "${@:4}"
