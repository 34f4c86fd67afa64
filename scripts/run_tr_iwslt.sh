#!/usr/bin/env bash
# German-to-English translation on IWSLT 2017 with T5: fine-tune (training section), then evaluate one decoding method with the
# early-exit decoder at batch size 1 (evaluation section), as in FREE's scripts. The sections, the
# decoding methods and the shared settings live in scripts/common.sh.
#
#   bash scripts/run_tr_iwslt.sh                       # train, then evaluate the full model
#   METHOD=softmax bash scripts/run_tr_iwslt.sh        # pick a method (see METHOD in scripts/common.sh)
#   DO_TRAIN=false MODEL=path/to/checkpoint METHOD=static bash scripts/run_tr_iwslt.sh
#   bash scripts/run_tr_iwslt.sh --max_eval_samples 100  # extra arguments go to both stages
#
# Offline: set TRAIN_FILE / VALIDATION_FILE to local files instead of the Hub dataset.
# Other variables (PYTHON, MODEL, OUTPUT_DIR, EVAL_DIR, DO_TRAIN, DO_EVAL, METHOD, STATIC_LAYER,
# MIN_LAYER, SHALLOW_LAYER, THRESHOLD) are read from the environment.
ENTRY=src/run_translation.py
OUTPUT_DIR_DEFAULT=save/iwslt_de_en_t5_large
HUB_DATA=(--dataset_name iwslt2017 --dataset_config_name iwslt2017-de-en)
TASK_ARGS=(--source_lang de --target_lang en --max_source_length 256 --max_target_length 256)
TRAIN_HPARAMS=(--per_device_train_batch_size 8 --per_device_eval_batch_size 32 --learning_rate 1e-4 --num_train_epochs 5 --warmup_steps 500)
source "$(dirname "$0")/common.sh"
