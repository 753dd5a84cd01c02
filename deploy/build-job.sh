#!/usr/bin/env bash
# From an empty volume to a TensorRT-LLM engine and a filled Triton model repository, inside
# the image of deploy/Dockerfile (the Kubernetes Job deploy/k8s/base/build-job.yaml runs it).
# Every step skips itself when its output is already complete, so a rerun resumes where the
# last one stopped. Settings come from the environment; run with --help for the list.
set -euo pipefail

PROJECT_DIR="${PROJECT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
PY="${PYTHON:-python3}"
DATA_DIR="${DATA_DIR:-/data}"
MODEL_SOURCE="${MODEL_SOURCE:-mistral-community/Mixtral-8x22B-v0.1}"
MODEL_REVISION="${MODEL_REVISION:-}"
GPU_TYPE="${GPU_TYPE:-H100-80GB}"
TP_SIZE="${TP_SIZE:-4}"
MAX_INPUT_LEN="${MAX_INPUT_LEN:-4096}"
MAX_OUTPUT_LEN="${MAX_OUTPUT_LEN:-1024}"
WORKLOAD="${WORKLOAD:-}"
ENGINE_TAG="${ENGINE_TAG:-}"
EXPECT_MAX_BATCH_SIZE="${EXPECT_MAX_BATCH_SIZE:-}"
EXPECT_MAX_NUM_TOKENS="${EXPECT_MAX_NUM_TOKENS:-}"
EXPECT_KV_CACHE_FREE_GPU_MEM_FRACTION="${EXPECT_KV_CACHE_FREE_GPU_MEM_FRACTION:-}"
CONVERT_WORKERS="${CONVERT_WORKERS:-1}"
CONVERT_MEMORY_BUDGET="${CONVERT_MEMORY_BUDGET:-}"
BUILD_WORKERS="${BUILD_WORKERS:-1}"
MAX_QUEUE_SIZE="${MAX_QUEUE_SIZE:-0}"
SKIP_DISK_CHECK="${SKIP_DISK_CHECK:-0}"

# Estimates, not measurements: the bf16 safetensors of Mixtral-8x22B-v0.1 (141 B parameters x
# 2 bytes), and its fp16 TensorRT-LLM checkpoint and engines are each about as large.
ESTIMATE_CHECKPOINT_BYTES=281000000000

ALL_STEPS="download,convert,verify,engine,fill"
EXIT_FAILED=1   # a step failed; running the job again resumes from that step
EXIT_REFUSED=3  # the settings cannot work (does not fit, wrong overlay numbers): do not retry

usage() {
  cat <<EOF
usage: deploy/build-job.sh [--steps LIST] [--dry-run] [--help]

Download -> plan capacity -> convert -> verify -> trtllm-build -> fill the model repository,
each step skipped when its output is complete (a rerun resumes).

  --steps LIST   comma-separated subset of $ALL_STEPS (default: all).
                 The capacity plan always runs first: it refuses before anything is
                 downloaded, and again with the downloaded config.json.
  --dry-run      print the commands of the steps still to do; change nothing
  --help         this text

Settings (environment variables, with defaults):
  DATA_DIR=/data                 the volume: hf/, trtllm-checkpoints/, engines/,
                                 model-repositories/, state/ are made under it
  MODEL_SOURCE=mistral-community/Mixtral-8x22B-v0.1
                                 hub repository id, or a local checkpoint folder (used in place)
  MODEL_REVISION=                branch, tag or commit of the hub repository (default: main)
  GPU_TYPE=H100-80GB             capacity plan and engine build GPU: A100-80GB, H100-80GB, ...
  TP_SIZE=4                      tensor parallel size = GPUs per replica
  MAX_INPUT_LEN=4096             longest prompt in tokens
  MAX_OUTPUT_LEN=1024            most generated tokens per request
  WORKLOAD=                      request shape INPUT/OUTPUT tokens the engine's max_batch_size is
                                 sized for (default 128/128, or full length where the limits are
                                 shorter); longer requests are still served, fewer at once
  ENGINE_TAG=<gpu>-tp<N>-in<I>-out<O>-b<max_batch_size of the plan>
                                 names engines/<tag> and model-repositories/<tag>; a new tag is a
                                 new engine beside the old one (rolling a new engine)
  EXPECT_MAX_BATCH_SIZE=         if set, the plan must give exactly these (the overlay's
  EXPECT_MAX_NUM_TOKENS=         numbers); otherwise the job refuses, exit $EXIT_REFUSED
  EXPECT_KV_CACHE_FREE_GPU_MEM_FRACTION=
  CONVERT_WORKERS=1              ranks converted at the same time
  CONVERT_MEMORY_BUDGET=         e.g. 8G: memory the converter's workers may use
  BUILD_WORKERS=1                ranks built at the same time (one GPU and ~one rank's weights
                                 of host memory each)
  MAX_QUEUE_SIZE=0               requests Triton queues before refusing (0: unbounded)
  SKIP_DISK_CHECK=0              1: do not refuse when the volume looks too small
  PYTHON=python3  PROJECT_DIR=<this checkout>  HF_HOME=\$DATA_DIR/hf-home  HF_TOKEN (optional)

Exit status: 0 done; $EXIT_FAILED a step failed (rerun resumes); $EXIT_REFUSED refused (fix the settings).
EOF
}

STEPS="$ALL_STEPS"
DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) [ $# -ge 2 ] || { echo "build-job: --steps needs a value" >&2; exit 2; }; STEPS="$2"; shift 2 ;;
    --steps=*) STEPS="${1#--steps=}"; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "build-job: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
for step in ${STEPS//,/ }; do
  case ",$ALL_STEPS," in
    *",$step,"*) ;;
    *) echo "build-job: unknown step '$step' in --steps (choose from $ALL_STEPS)" >&2; exit 2 ;;
  esac
done

log() { printf '%s build-job: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }
refuse() { log "refused: $*"; exit "$EXIT_REFUSED"; }
fail() { log "failed: $*"; exit "$EXIT_FAILED"; }
wanted() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
show() { printf '+'; printf ' %q' "$@"; printf '\n'; }
# Print a command, then run it unless this is a dry run.
run() { show "$@"; [ "$DRY_RUN" = 1 ] || "$@"; }
json_fields() { "$PY" -c 'import json, sys; d = json.loads(sys.argv[1]); print(*(d[k] for k in sys.argv[2:]))' "$@"; }
bytes_in() { if [ -e "$1" ]; then du -sb "$1" 2>/dev/null | cut -f1; else echo 0; fi; }

# --- Where everything goes --------------------------------------------------------------------
if [ -d "$MODEL_SOURCE" ]; then
  HF_DIR="$(cd "$MODEL_SOURCE" && pwd)"  # a local checkpoint is used in place
  LOCAL_SOURCE=1
else
  HF_DIR="$DATA_DIR/hf/${MODEL_SOURCE##*/}"
  LOCAL_SOURCE=0
fi
MODEL_NAME="$(basename "$HF_DIR")"
CKPT_DIR="$DATA_DIR/trtllm-checkpoints/$MODEL_NAME-tp$TP_SIZE-fp16"
STATE_DIR="$DATA_DIR/state"
export HF_HOME="${HF_HOME:-$DATA_DIR/hf-home}"

log "checkpoint $HF_DIR"
log "trtllm checkpoint $CKPT_DIR"
[ "$DRY_RUN" = 1 ] && log "dry run: printing the commands of the steps still to do"

# --- Capacity plan: refuse before spending hours ----------------------------------------------
PLAN_FROM=""
plan() {
  local args=("$PROJECT_DIR/build/plan_capacity.py" --gpu "$GPU_TYPE" --gpus "$TP_SIZE"
              --max-input-len "$MAX_INPUT_LEN" --max-output-len "$MAX_OUTPUT_LEN" --json)
  [ -n "$WORKLOAD" ] && args+=(--workload "$WORKLOAD")
  PLAN_FROM="built-in Mixtral-8x22B shape"
  if [ -f "$HF_DIR/config.json" ]; then
    args+=(--model-config "$HF_DIR/config.json")
    PLAN_FROM="$HF_DIR/config.json"
  fi
  show "$PY" "${args[@]}"
  local out
  out="$("$PY" "${args[@]}")" || refuse "the capacity plan above does not fit $TP_SIZE x $GPU_TYPE"
  read -r PLAN_MAX_BATCH_SIZE PLAN_MAX_NUM_TOKENS PLAN_MAX_SEQ_LEN PLAN_KV_FRACTION PLAN_CANCEL_PERIOD_MS < <(
    json_fields "$out" max_batch_size max_num_tokens max_seq_len kv_cache_free_gpu_mem_fraction \
      cancellation_check_period_ms)
  log "plan ($PLAN_FROM): max_batch_size $PLAN_MAX_BATCH_SIZE, max_num_tokens $PLAN_MAX_NUM_TOKENS," \
      "max_seq_len $PLAN_MAX_SEQ_LEN, kv_cache_free_gpu_mem_fraction $PLAN_KV_FRACTION"
  local name expect want have
  for name in MAX_BATCH_SIZE MAX_NUM_TOKENS KV_CACHE_FREE_GPU_MEM_FRACTION; do
    expect="EXPECT_$name"
    want="${!expect}"
    case "$name" in
      MAX_BATCH_SIZE) have="$PLAN_MAX_BATCH_SIZE" ;;
      MAX_NUM_TOKENS) have="$PLAN_MAX_NUM_TOKENS" ;;
      KV_CACHE_FREE_GPU_MEM_FRACTION) have="$PLAN_KV_FRACTION" ;;
    esac
    if [ -n "$want" ] && ! "$PY" -c 'import sys; sys.exit(float(sys.argv[1]) != float(sys.argv[2]))' "$want" "$have"; then
      refuse "the deployment expects ${name,,} $want but the plan gives $have: render the overlay" \
             "again (build/plan_capacity.py --gpu $GPU_TYPE ... --render-overlay, deploy/k8s/README.md)"
    fi
  done
}
plan
# The engine's folders, named by default after the plan's limits: an engine built with other
# limits gets a folder of its own.
gpu_tag="$(printf '%s' "$GPU_TYPE" | tr '[:upper:]' '[:lower:]')"
ENGINE_TAG="${ENGINE_TAG:-$gpu_tag-tp$TP_SIZE-in$MAX_INPUT_LEN-out$MAX_OUTPUT_LEN-b$PLAN_MAX_BATCH_SIZE}"
case "$ENGINE_TAG" in */*|.*|"") refuse "ENGINE_TAG '$ENGINE_TAG' must be a plain folder name" ;; esac
ENGINE_DIR="$DATA_DIR/engines/$ENGINE_TAG"
REPO_DIR="$DATA_DIR/model-repositories/$ENGINE_TAG"
BUILD_RECORD="$ENGINE_DIR/mixtral_triton_build.json"  # written by build_engine.py after success
FILL_MARKER="$REPO_DIR/.mixtral-triton-fill.json"     # written by fill_model_repository.py
log "engine $ENGINE_DIR"
log "model repository $REPO_DIR"

# --- Disk: refuse when what is left to write cannot fit (estimates) ---------------------------
checkpoint_complete() { "$PY" "$PROJECT_DIR/build/download_checkpoint.py" "$HF_DIR" >/dev/null 2>&1; }
check_disk() {
  local source_bytes=$ESTIMATE_CHECKPOINT_BYTES need=0 avail
  if checkpoint_complete; then
    source_bytes="$(bytes_in "$HF_DIR")"
  elif wanted download && [ "$LOCAL_SOURCE" = 0 ]; then
    need=$((need + source_bytes - $(bytes_in "$HF_DIR")))
  fi
  if wanted convert && [ ! -f "$CKPT_DIR/config.json" ]; then
    need=$((need + source_bytes - $(bytes_in "$CKPT_DIR")))
  fi
  if wanted engine && [ ! -f "$BUILD_RECORD" ]; then
    need=$((need + source_bytes))
  fi
  [ -d "$DATA_DIR" ] || { log "disk: $DATA_DIR does not exist yet; about $((need / 1000000000)) GB to write"; return 0; }
  avail="$(df -B1 --output=avail "$DATA_DIR" | tail -n 1 | tr -d ' ')"
  log "disk: about $((need / 1000000000)) GB still to write (estimate), $((avail / 1000000000)) GB free on $DATA_DIR"
  if [ "$avail" -lt $((need + need / 20)) ]; then
    if [ "$SKIP_DISK_CHECK" = 1 ] || [ "$DRY_RUN" = 1 ]; then
      log "warning: $DATA_DIR looks too small for the steps left"
    else
      refuse "$DATA_DIR has $((avail / 1000000000)) GB free and the steps left need about" \
             "$((need / 1000000000)) GB (+5%); enlarge the volume or set SKIP_DISK_CHECK=1"
    fi
  fi
}
check_disk

# Nothing is written before here.
if [ "$DRY_RUN" = 0 ]; then
  if [ -d "$DATA_DIR" ] && [ ! -w "$DATA_DIR" ]; then
    refuse "$DATA_DIR is not writable by uid $(id -u) gid $(id -g): give the volume to them" \
           "(fsGroup does not apply to every volume type, e.g. NFS: chown it once)"
  fi
  mkdir -p "$DATA_DIR" "$STATE_DIR"
  # One build job per volume at a time: two would write the same folders.
  if command -v flock >/dev/null 2>&1; then
    exec 9>>"$STATE_DIR/build-job.lock"
    flock -n 9 || fail "another build-job holds $STATE_DIR/build-job.lock"
  fi
fi

# --- 1. Download (safetensors, configs and tokenizer only; resumable) -------------------------
if wanted download; then
  if checkpoint_complete; then
    log "download: $HF_DIR is complete, skipped"
  elif [ "$LOCAL_SOURCE" = 1 ]; then
    run "$PY" "$PROJECT_DIR/build/download_checkpoint.py" "$HF_DIR" || refuse "$HF_DIR is not a complete checkpoint"
  else
    args=("$PROJECT_DIR/build/download_checkpoint.py" "$MODEL_SOURCE" --local-dir "$HF_DIR")
    [ -n "$MODEL_REVISION" ] && args+=(--revision "$MODEL_REVISION")
    log "download: $MODEL_SOURCE -> $HF_DIR"
    run "$PY" "${args[@]}" || fail "download; rerun to resume it"
    # The plan again, now from the model's own config.json.
    [ "$DRY_RUN" = 1 ] || plan
  fi
fi

# --- 2. Convert to a TensorRT-LLM checkpoint (config.json is written last: present = complete) -
if wanted convert; then
  if [ -f "$CKPT_DIR/config.json" ]; then
    log "convert: $CKPT_DIR is complete, skipped"
  else
    args=("$PROJECT_DIR/build/convert_checkpoint.py" convert "$HF_DIR" "$CKPT_DIR"
          --tp-size "$TP_SIZE" --dtype float16 --workers "$CONVERT_WORKERS")
    [ -n "$CONVERT_MEMORY_BUDGET" ] && args+=(--memory-budget "$CONVERT_MEMORY_BUDGET")
    [ "$DRY_RUN" = 1 ] || mkdir -p "$(dirname "$CKPT_DIR")"
    log "convert: $HF_DIR -> $CKPT_DIR (tp $TP_SIZE, float16)"
    run "$PY" "${args[@]}" || fail "convert; rerun to resume it (finished ranks are kept)"
  fi
fi

# --- 3. Verify the converted checkpoint against its source, on CPU ----------------------------
fingerprint() { cat "$CKPT_DIR/config.json" "$CKPT_DIR/manifest.json" 2>/dev/null | sha256sum | cut -d' ' -f1; }
VERIFIED_MARKER="$STATE_DIR/verified-$(basename "$CKPT_DIR")"
if wanted verify; then
  if [ -f "$VERIFIED_MARKER" ] && [ "$(cat "$VERIFIED_MARKER")" = "$(fingerprint)" ]; then
    log "verify: $CKPT_DIR already verified, skipped"
  else
    log "verify: $CKPT_DIR against $HF_DIR"
    run "$PY" "$PROJECT_DIR/build/convert_checkpoint.py" verify "$HF_DIR" "$CKPT_DIR" \
      || fail "verify: the converted checkpoint differs from its source; remove $CKPT_DIR and rerun"
    [ "$DRY_RUN" = 1 ] || fingerprint > "$VERIFIED_MARKER"
  fi
fi

# --- 4. Build the engines with trtllm-build (needs the GPUs) ----------------------------------
if wanted engine; then
  if [ -f "$BUILD_RECORD" ]; then
    # An engine folder is only reused for the very settings it was built with.
    built="$("$PY" -c 'import json, sys; p = json.load(open(sys.argv[1]))["plan"]; print(p["gpu"], p["tp"], p["max_input_len"], p["max_output_len"], p["max_batch_size"])' "$BUILD_RECORD")"
    [ "$built" = "$GPU_TYPE $TP_SIZE $MAX_INPUT_LEN $MAX_OUTPUT_LEN $PLAN_MAX_BATCH_SIZE" ] \
      || refuse "$ENGINE_DIR was built for '$built' (gpu tp input output max_batch_size), not" \
                "'$GPU_TYPE $TP_SIZE $MAX_INPUT_LEN $MAX_OUTPUT_LEN $PLAN_MAX_BATCH_SIZE': set a new ENGINE_TAG"
    log "engine: $ENGINE_DIR is built, skipped"
  else
    [ "$DRY_RUN" = 1 ] || [ -f "$CKPT_DIR/config.json" ] || fail "engine: $CKPT_DIR is not converted yet (step convert)"
    if [ -e "$ENGINE_DIR" ]; then
      # No build record: an interrupted build. build_engine.py only writes into an empty folder.
      log "engine: removing the unfinished build in $ENGINE_DIR"
      run rm -rf -- "$ENGINE_DIR"
    fi
    [ "$DRY_RUN" = 1 ] || mkdir -p "$(dirname "$ENGINE_DIR")"
    log "engine: trtllm-build $CKPT_DIR -> $ENGINE_DIR"
    args=("$PROJECT_DIR/build/build_engine.py" --checkpoint-dir "$CKPT_DIR" --output-dir "$ENGINE_DIR"
          --gpu "$GPU_TYPE" --max-input-len "$MAX_INPUT_LEN" --max-output-len "$MAX_OUTPUT_LEN"
          --workers "$BUILD_WORKERS")
    [ -n "$WORKLOAD" ] && args+=(--workload "$WORKLOAD")
    run "$PY" "${args[@]}" || fail "engine build; rerun to start it again"
  fi
fi

# --- 5. Fill the model repository the Triton pods serve --------------------------------------
if wanted fill; then
  fill_args=("$PROJECT_DIR/build/fill_model_repository.py" --target gpu --out "$REPO_DIR"
             --templates "$PROJECT_DIR/model_repository" --tokenizer-dir "$HF_DIR"
             --engine-dir "$ENGINE_DIR" --triton-max-batch-size "$PLAN_MAX_BATCH_SIZE"
             --max-input-len "$MAX_INPUT_LEN" --max-seq-len "$PLAN_MAX_SEQ_LEN"
             --kv-cache-free-gpu-mem-fraction "$PLAN_KV_FRACTION" --max-queue-size "$MAX_QUEUE_SIZE"
             --cancellation-check-period-ms "$PLAN_CANCEL_PERIOD_MS"
             --gpu-device-ids "$(seq -s, 0 $((TP_SIZE - 1)))")
  # The fill also compiles the C++ detokenizer (postprocessing) with this image's g++ (the
  # image has it compiled already) and copies the library into the repository: a new image
  # with other templates or detokenizer sources fills again, even with the same settings.
  fill_sources="$("$PY" -c 'from mixtral_triton.repository.fill import sources_digest; print(sources_digest())')" \
    || fail "fill: cannot read the templates and the detokenizer's sources"
  FILL_STAMP="$STATE_DIR/filled-$ENGINE_TAG"
  if [ -f "$FILL_MARKER" ] && [ -f "$FILL_STAMP" ] && [ "$(cat "$FILL_STAMP")" = "${fill_args[*]} $fill_sources" ]; then
    log "fill: $REPO_DIR is filled with these settings, skipped"
  else
    [ "$DRY_RUN" = 1 ] || [ -f "$BUILD_RECORD" ] || fail "fill: $ENGINE_DIR has no finished engine yet (step engine)"
    log "fill: $REPO_DIR"
    run "$PY" "${fill_args[@]}" || fail "fill"
    [ "$DRY_RUN" = 1 ] || printf '%s' "${fill_args[*]} $fill_sources" > "$FILL_STAMP"
  fi
fi

log "done: serve with scripts/launch_triton.py --target gpu --world-size $TP_SIZE --model-repository $REPO_DIR"
