#!/usr/bin/env bash
# A resumable grid of early-exit settings on one task; writes a table and Pareto plots.
#
#   bash scripts/run_sweep.sh                     # the defaults below
#   MODEL=save/squad_t5_large TASK=qa VALIDATION_FILE=dev-v1.1.json bash scripts/run_sweep.sh
#   TASK=qa bash scripts/run_sweep.sh             # the QA demo model (python src/demo.py --task qa)
#   bash scripts/run_sweep.sh --max_eval_samples 200   # extra arguments go to every cell
#
# Stop it at any time: finished cells are kept, and the next run skips them.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
TASK=${TASK:-summarization}                        # qa | summarization | translation
# a fine-tuned checkpoint; by default the demo's (`make demo`: data-to-text; `--task qa`: QA)
case "$TASK" in
  qa) DEMO=cache/demo_model; DEMO_EVAL=eval.json ;;
  *) DEMO=cache/demo_bio; DEMO_EVAL=eval.jsonl ;;
esac
MODEL=${MODEL:-$DEMO/model}
VALIDATION_FILE=${VALIDATION_FILE:-$DEMO/data/$DEMO_EVAL}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/sweep_$TASK}
THRESHOLDS=${THRESHOLDS:-0.5,0.7,0.8,0.9,0.95}
CONF_TYPES=${CONF_TYPES:-softmax,reweight_contrastive_decoding,JSD_contrastive_confidence}
REDUCTIONS=${REDUCTIONS:-none,fixed,decaying,adaptive}
MIN_LAYERS=${MIN_LAYERS:-3}
STATIC_LAYERS=${STATIC_LAYERS:-1,2,3,4,5}

"$PYTHON" src/run_sweep.py --task "$TASK" --output_dir "$OUTPUT_DIR" \
  --thresholds "$THRESHOLDS" --conf_types "$CONF_TYPES" --reductions "$REDUCTIONS" \
  --min_layers "$MIN_LAYERS" --static_layers "$STATIC_LAYERS" \
  -- --model_name_or_path "$MODEL" --validation_file "$VALIDATION_FILE" "$@"
