#!/usr/bin/env bash
# Multi-News summarization (several news articles to one summary) with T5: fine-tune (training
# section), then evaluate one decoding method with the early-exit decoder at batch size 1
# (evaluation section), as in FREE's scripts. The sections, the decoding methods and the shared
# settings live in scripts/common.sh. FREE ran this dataset on LongT5 with 2048 source tokens; the
# early-exit decoder here is T5's, so the defaults are T5-large with the same lengths (lower
# --max_source_length if memory is short).
#
#   bash scripts/run_sum_multinews.sh                       # train, then evaluate the full model
#   METHOD=softmax bash scripts/run_sum_multinews.sh        # pick a method (see METHOD in scripts/common.sh)
#   DO_TRAIN=false MODEL=path/to/checkpoint METHOD=static bash scripts/run_sum_multinews.sh
#   bash scripts/run_sum_multinews.sh --max_eval_samples 100  # extra arguments go to both stages
#
# Offline: set TRAIN_FILE / VALIDATION_FILE to local files instead of the Hub dataset.
# Other variables (PYTHON, MODEL, OUTPUT_DIR, EVAL_DIR, DO_TRAIN, DO_EVAL, METHOD, STATIC_LAYER,
# MIN_LAYER, SHALLOW_LAYER, THRESHOLD) are read from the environment.
ENTRY=src/run_summarization.py
OUTPUT_DIR_DEFAULT=save/multinews_t5_large
HUB_DATA=(--dataset_name multi_news)
TASK_ARGS=(--text_column document --summary_column summary --max_source_length 2048 --max_target_length 512)
TRAIN_HPARAMS=(--per_device_train_batch_size 2 --per_device_eval_batch_size 8 --learning_rate 1e-4 --num_train_epochs 3 --warmup_steps 500)
source "$(dirname "$0")/common.sh"
