"""Train and evaluate T5 with early-exit decoding on question answering (HF example-script conventions).

    python src/run_question_answering.py --model_name_or_path MODEL --output_dir DIR --do_eval ...
    python src/run_question_answering.py args.json

See scripts/ for complete runs and README.md ("Tasks, scripts and data") for the options.
"""

from tasks.adapters import QuestionAnswering
from tasks.runner import main
from util.cli import run_entry_point

if __name__ == "__main__":
    run_entry_point(main, QuestionAnswering())
