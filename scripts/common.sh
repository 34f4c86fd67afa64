# Shared by the scripts/run_[TASK]_[DATASET].sh scripts, which set their task's variables and then
# source this file: the settings everyone shares, the training section and the evaluation section.
#
# The calling script sets: ENTRY (the Python entry point), OUTPUT_DIR_DEFAULT, HUB_DATA (the Hub
# dataset arguments), TASK_ARGS (lengths and columns), TRAIN_HPARAMS (batch sizes, epochs, ...).
# Everything below can be overridden from the environment.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# ----- settings -----------------------------------------------------------------------------------
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
MODEL=${MODEL:-google-t5/t5-large}       # pretrained model to fine-tune, or a checkpoint with DO_TRAIN=false
OUTPUT_DIR=${OUTPUT_DIR:-$OUTPUT_DIR_DEFAULT}   # the fine-tuned model
EVAL_DIR=${EVAL_DIR:-$OUTPUT_DIR/eval}   # one sub-folder per decoding method
DO_TRAIN=${DO_TRAIN:-true}
DO_EVAL=${DO_EVAL:-true}
METHOD=${METHOD:-full}
STATIC_LAYER=${STATIC_LAYER:-12}         # decoder layers of the methods (T5-large has 24)
MIN_LAYER=${MIN_LAYER:-4}
SHALLOW_LAYER=${SHALLOW_LAYER:-6}
THRESHOLD=${THRESHOLD:-0.9}

# data: the Hub dataset, or local files when TRAIN_FILE / VALIDATION_FILE are set
TRAIN_FILE=${TRAIN_FILE:-}
VALIDATION_FILE=${VALIDATION_FILE:-}
if [ -n "$TRAIN_FILE$VALIDATION_FILE" ]; then
  DATA=()
  if [ -n "$TRAIN_FILE" ]; then DATA+=(--train_file "$TRAIN_FILE"); fi
  if [ -n "$VALIDATION_FILE" ]; then DATA+=(--validation_file "$VALIDATION_FILE"); fi
else
  DATA=("${HUB_DATA[@]}")
fi

# the decoding method's arguments, before any work: an unknown METHOD stops here (status 2)
# The methods are the table in src/util/methods.py (full, static, softmax, meta, state, decay,
# vocab_fixed, vocab_decaying, vocab_adaptive, vocab_decaying_rerank, contrastive, reweight, jsd,
# shallow_deep, shallow_deep_adaptive), which prints the arguments of METHOD.
METHOD_LINES=$("$PYTHON" src/util/methods.py "$METHOD" --threshold "$THRESHOLD" --min_layer "$MIN_LAYER" \
  --static_layer "$STATIC_LAYER" --shallow_layer "$SHALLOW_LAYER")
METHOD_ARGS=()
if [ -n "$METHOD_LINES" ]; then mapfile -t METHOD_ARGS <<< "$METHOD_LINES"; fi

# ----- training -----------------------------------------------------------------------------------
# Training objective: pick one.
TRAIN_METHOD=()                                                                                  # full model: last layer only
# TRAIN_METHOD=(--output_hidden_states_decoder True --intermediate_loss_fn weighted_ce)           # CALM: every layer, weighted
# TRAIN_METHOD=(--output_hidden_states_decoder True --intermediate_loss_fn shallowdeep_kd_dyna \
#               --shallow_exit_layer "$SHALLOW_LAYER" --distill_layer_alpha 0.5)                   # FREE: shallow-deep distillation
# TRAIN_METHOD=(--output_hidden_states_decoder True --train_meta_cm_head True)                    # meta confidence head
# TRAIN_METHOD+=(--use_lora True --lora_rank 8)                                                   # LoRA adapters, merged when saved
if [ "$DO_TRAIN" = true ]; then
  "$PYTHON" "$ENTRY" \
    --model_name_or_path "$MODEL" "${DATA[@]}" "${TASK_ARGS[@]}" \
    --do_train --do_eval \
    --output_dir "$OUTPUT_DIR" \
    "${TRAIN_HPARAMS[@]}" \
    --save_strategy epoch --save_total_limit 1 --logging_steps 100 \
    "${TRAIN_METHOD[@]}" "$@"
  MODEL=$OUTPUT_DIR
fi

# ----- evaluation ---------------------------------------------------------------------------------
# Decoding methods: every one runs in the deploy scenario (speed and exit statistics; batch size 1
# unless --per_device_eval_batch_size is given, with identical results at any size).
# METHOD_ARGS+=(--count_flops True)        # FLOPs of blocks, confidence and encoder
# METHOD_ARGS+=(--plotting_logits True)    # per-layer ranks, confidence and agreement plots
if [ "$DO_EVAL" = true ]; then
  "$PYTHON" "$ENTRY" \
    --model_name_or_path "$MODEL" "${DATA[@]}" "${TASK_ARGS[@]}" \
    --do_eval \
    --output_dir "$EVAL_DIR/$METHOD" \
    --deploy_scenario True \
    "${METHOD_ARGS[@]}" "$@"
fi
