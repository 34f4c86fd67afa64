#!/usr/bin/env bash
# BIGPATENT summarization (patent description to abstract; category e, as in FREE) with LongT5, as FREE
# ran it: fine-tune google/long-t5-tglobal-base (training section), then evaluate one decoding
# method with the early-exit decoder at batch size 1 (evaluation section). The sections, the
# decoding methods and the shared settings live in scripts/common.sh. FREE's lengths (2048 source,
# 512 target tokens) and hyperparameters (no warm-up); LongT5-base has 12 decoder layers, so the
# methods' layers are FREE's for it (static exit 6, shallow exit 6, minimum exit layer 4). MODEL
# may be any supported T5-family checkpoint (t5, mt5, longt5; see the README): set the layers to
# suit its depth.
#
#   bash scripts/run_sum_bigpatent.sh                       # train, then evaluate the full model
#   METHOD=softmax bash scripts/run_sum_bigpatent.sh        # pick a method (see METHOD in scripts/common.sh)
#   DO_TRAIN=false MODEL=path/to/checkpoint METHOD=static bash scripts/run_sum_bigpatent.sh
#   bash scripts/run_sum_bigpatent.sh --max_eval_samples 100  # extra arguments go to both stages
#
# Offline: set TRAIN_FILE / VALIDATION_FILE to local files instead of the Hub dataset.
# Other variables (PYTHON, MODEL, OUTPUT_DIR, EVAL_DIR, DO_TRAIN, DO_EVAL, METHOD, STATIC_LAYER,
# MIN_LAYER, SHALLOW_LAYER, THRESHOLD) are read from the environment.
ENTRY=src/run_summarization.py
MODEL=${MODEL:-google/long-t5-tglobal-base}
STATIC_LAYER=${STATIC_LAYER:-6}
MIN_LAYER=${MIN_LAYER:-4}
SHALLOW_LAYER=${SHALLOW_LAYER:-6}
OUTPUT_DIR_DEFAULT=save/bigpatent_longt5_base
HUB_DATA=(--dataset_name big_patent --dataset_config_name e)
TASK_ARGS=(--text_column description --summary_column abstract --max_source_length 2048 --max_target_length 512)
TRAIN_HPARAMS=(--per_device_train_batch_size 2 --per_device_eval_batch_size 16 --learning_rate 1e-4 --num_train_epochs 3)
source "$(dirname "$0")/common.sh"
