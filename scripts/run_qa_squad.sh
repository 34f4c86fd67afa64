#!/usr/bin/env bash
# Question answering on SQuAD v1.1 with T5: fine-tune (training section), then evaluate one decoding method with the
# early-exit decoder at batch size 1 (evaluation section), as in FREE's scripts. The sections, the
# decoding methods and the shared settings live in scripts/common.sh.
#
#   bash scripts/run_qa_squad.sh                       # train, then evaluate the full model
#   METHOD=softmax bash scripts/run_qa_squad.sh        # pick a method (see METHOD in scripts/common.sh)
#   DO_TRAIN=false MODEL=path/to/checkpoint METHOD=static bash scripts/run_qa_squad.sh
#   bash scripts/run_qa_squad.sh --max_eval_samples 100  # extra arguments go to both stages
#
# Offline: set TRAIN_FILE / VALIDATION_FILE to local files instead of the Hub dataset.
# Other variables (PYTHON, MODEL, OUTPUT_DIR, EVAL_DIR, DO_TRAIN, DO_EVAL, METHOD, STATIC_LAYER,
# MIN_LAYER, SHALLOW_LAYER, THRESHOLD) are read from the environment.
ENTRY=src/run_question_answering.py
OUTPUT_DIR_DEFAULT=save/squad_t5_large
HUB_DATA=(--dataset_name squad)
TASK_ARGS=(--max_seq_length 384 --max_answer_length 30)
TRAIN_HPARAMS=(--per_device_train_batch_size 4 --per_device_eval_batch_size 16 --learning_rate 1e-4 --num_train_epochs 3 --warmup_steps 500)
source "$(dirname "$0")/common.sh"
