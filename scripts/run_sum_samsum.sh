#!/usr/bin/env bash
# Summarization of SAMSum dialogues with T5: fine-tune (training section), then evaluate one decoding method with the
# early-exit decoder at batch size 1 (evaluation section), as in FREE's scripts.
#
#   bash scripts/run_sum_samsum.sh                       # train, then evaluate the full model
#   METHOD=softmax bash scripts/run_sum_samsum.sh        # pick a method (see "Decoding methods" below)
#   DO_TRAIN=false MODEL=path/to/checkpoint METHOD=static bash scripts/run_sum_samsum.sh
#   bash scripts/run_sum_samsum.sh --max_eval_samples 100  # extra arguments go to both stages
#
# Offline: set TRAIN_FILE / VALIDATION_FILE to local files instead of the Hub dataset.
set -euo pipefail
cd "$(dirname "$0")/.."

# ----- settings -----------------------------------------------------------------------------------
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
MODEL=${MODEL:-google-t5/t5-large}       # pretrained model to fine-tune, or a checkpoint with DO_TRAIN=false
OUTPUT_DIR=${OUTPUT_DIR:-save/samsum_t5_large}   # the fine-tuned model
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
  DATA=(--dataset_name samsum)
fi
TASK_ARGS=(--text_column dialogue --summary_column summary --max_source_length 512 --max_target_length 128)

# ----- training -----------------------------------------------------------------------------------
# Training objective (the intermediate-layer losses arrive with their issue; until then these fail
# with "not implemented yet"):
TRAIN_METHOD=()                                                                                  # full model: last layer only
# TRAIN_METHOD=(--output_hidden_states_decoder True --intermediate_loss_fn weighted_ce)           # CALM: every layer, weighted
# TRAIN_METHOD=(--output_hidden_states_decoder True --intermediate_loss_fn shallowdeep_kd_dyna \
#               --shallow_exit_layer "$SHALLOW_LAYER" --distill_layer_alpha 0.5)                   # FREE: shallow-deep distillation
# TRAIN_METHOD=(--output_hidden_states_decoder True --train_meta_cm_head True)                    # meta confidence head
if [ "$DO_TRAIN" = true ]; then
  "$PYTHON" src/run_summarization.py \
    --model_name_or_path "$MODEL" "${DATA[@]}" "${TASK_ARGS[@]}" \
    --do_train --do_eval \
    --output_dir "$OUTPUT_DIR" \
    --per_device_train_batch_size 4 --per_device_eval_batch_size 16 \
    --learning_rate 1e-4 --num_train_epochs 20 --warmup_steps 500 \
    --save_strategy epoch --save_total_limit 1 --logging_steps 100 \
    "${TRAIN_METHOD[@]}" "$@"
  MODEL=$OUTPUT_DIR
fi

# ----- evaluation ---------------------------------------------------------------------------------
# Decoding methods: every one runs in the deploy scenario (batch size 1, speed and exit statistics).
case "$METHOD" in
  full)     METHOD_ARGS=() ;;                                                                     # all decoder blocks
  static)   METHOD_ARGS=(--static_exit_layer "$STATIC_LAYER") ;;                                  # static exit
  softmax)  METHOD_ARGS=(--use_early_exit True --exit_conf_type softmax --exit_conf_threshold "$THRESHOLD" --exit_min_layer "$MIN_LAYER") ;;
  meta)     METHOD_ARGS=(--use_early_exit True --exit_conf_type meta --exit_conf_threshold "$THRESHOLD" --exit_min_layer "$MIN_LAYER") ;;  # needs a trained meta head
  state)    METHOD_ARGS=(--use_early_exit True --exit_conf_type state --exit_conf_threshold "$THRESHOLD" --exit_min_layer "$MIN_LAYER") ;;
  decay)    METHOD_ARGS=(--use_early_exit True --exit_conf_type softmax --exit_conf_threshold "$THRESHOLD" --exit_position_temp 4) ;;  # position-decaying threshold
  vocab_fixed)    METHOD_ARGS=(--use_early_exit True --exit_conf_type softmax --exit_conf_threshold "$THRESHOLD" --type_vocab_reduct fixed) ;;
  vocab_decaying) METHOD_ARGS=(--use_early_exit True --exit_conf_type softmax --exit_conf_threshold "$THRESHOLD" --type_vocab_reduct decaying) ;;
  vocab_adaptive) METHOD_ARGS=(--use_early_exit True --exit_conf_type softmax --exit_conf_threshold "$THRESHOLD" --type_vocab_reduct adaptive) ;;
  contrastive)    METHOD_ARGS=(--use_early_exit True --exit_conf_type contrastive_decoding --exit_conf_threshold "$THRESHOLD") ;;
  reweight)       METHOD_ARGS=(--use_early_exit True --exit_conf_type reweight_contrastive_decoding --exit_conf_threshold "$THRESHOLD") ;;
  jsd)            METHOD_ARGS=(--use_early_exit True --exit_conf_type JSD_contrastive_confidence --exit_conf_threshold "$THRESHOLD") ;;
  shallow_deep)   METHOD_ARGS=(--use_shallow_deep True --shallow_exit_layer "$SHALLOW_LAYER" --shallow2deep_conf_type softmax --shallow2deep_conf_threshold "$THRESHOLD") ;;  # FREE
  shallow_deep_adaptive) METHOD_ARGS=(--use_shallow_deep True --shallow_exit_layer "$SHALLOW_LAYER" --shallow2deep_conf_type softmax --use_adapt_threshold True) ;;
  *) echo "unknown METHOD=$METHOD (full, static, softmax, meta, state, decay, vocab_fixed, vocab_decaying, vocab_adaptive, contrastive, reweight, jsd, shallow_deep, shallow_deep_adaptive)" >&2; exit 2 ;;
esac
# METHOD_ARGS+=(--count_flops True)        # FLOPs of blocks, confidence and encoder
# METHOD_ARGS+=(--plotting_logits True)    # per-layer ranks, confidence and agreement plots
if [ "$DO_EVAL" = true ]; then
  "$PYTHON" src/run_summarization.py \
    --model_name_or_path "$MODEL" "${DATA[@]}" "${TASK_ARGS[@]}" \
    --do_eval \
    --output_dir "$EVAL_DIR/$METHOD" \
    --deploy_scenario True \
    "${METHOD_ARGS[@]}" "$@"
fi
