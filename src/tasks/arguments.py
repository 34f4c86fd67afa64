"""The one argument set of the three task scripts, with HuggingFace's example-script names.

Arguments that only one task reads default to None here; the task fills its own default
(`TaskAdapter.defaults`) and rejects another task's arguments, so nothing is silently ignored.
"""

import json
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from transformers import HfArgumentParser, Seq2SeqTrainingArguments

from util.additional_args import AdditionalArguments


def _arg(default, help_text):
    return field(default=default, metadata={"help": help_text})


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Local model directory or HuggingFace Hub name (T5)."})
    config_name: Optional[str] = _arg(None, "Config directory or Hub name, if not the model's.")
    tokenizer_name: Optional[str] = _arg(None, "Tokenizer directory or Hub name, if not the model's.")
    cache_dir: Optional[str] = _arg(None, "Where downloads from the Hub are cached.")
    model_revision: str = _arg("main", "Model revision on the Hub (branch, tag or commit).")
    gguf_file: Optional[str] = _arg(None, "GGUF file in --model_name_or_path (as HF's gguf_file; or a path of its own): "
                                    "converted once to an HF folder under cache/gguf/, which is loaded instead. "
                                    "Needs: pip install -r requirements-gemma.txt")


@dataclass
class DataTrainingArguments:
    dataset_name: Optional[str] = _arg(None, "Hub dataset name (squad, samsum, cnn_dailymail, xsum, iwslt2017, ...).")
    dataset_config_name: Optional[str] = _arg(None, "Hub dataset configuration (e.g. 3.0.0, iwslt2017-de-en).")
    train_file: Optional[str] = _arg(None, "Local training file: json, jsonl, csv or SQuAD's nested json.")
    validation_file: Optional[str] = _arg(None, "Local evaluation file (--do_eval).")
    test_file: Optional[str] = _arg(None, "Local test file (--do_predict).")
    max_train_samples: Optional[int] = _arg(None, "Use only the first N training rows.")
    max_eval_samples: Optional[int] = _arg(None, "Use only the first N evaluation rows.")
    max_predict_samples: Optional[int] = _arg(None, "Use only the first N test rows.")
    source_prefix: Optional[str] = _arg(None, "Text put before every input (T5 task prefix); default per task.")
    prompt_template: Optional[str] = _arg(None, "Decoder-only models: the prompt around each source, with {source} "
                                          "where it goes (default per task, e.g. '{source}\\nsummary:').")
    preprocessing_num_workers: Optional[int] = _arg(None, "Processes for tokenisation.")
    overwrite_output_dir: bool = _arg(False, "Allow writing into an output_dir that is not empty.")
    length_counts_start_token: bool = _arg(False, "The generated length (--max_answer_length, --val_max_target_length, "
                                           "--generation_max_length) counts the decoder start token, as HF's max_length "
                                           "and FREE's QA evaluation do: N generates N - 1 tokens (default: N tokens).")
    # question answering
    question_column: Optional[str] = _arg(None, "QA: column of questions (default: question).")
    context_column: Optional[str] = _arg(None, "QA: column of contexts (default: context).")
    answer_column: Optional[str] = _arg(None, "QA: column of answers {text, answer_start} (default: answers).")
    max_seq_length: Optional[int] = _arg(None, "QA: maximum input length in tokens (default: 384).")
    max_answer_length: Optional[int] = _arg(None, "QA: maximum answer length in tokens (default: 30).")
    # summarization
    text_column: Optional[str] = _arg(None, "Summarization: column of documents (default: per dataset, else text).")
    summary_column: Optional[str] = _arg(None, "Summarization: column of summaries (default: per dataset, else summary).")
    # translation
    source_lang: Optional[str] = _arg(None, "Translation: source language code, a key of the translation column.")
    target_lang: Optional[str] = _arg(None, "Translation: target language code, a key of the translation column.")
    # summarization and translation
    max_source_length: Optional[int] = _arg(None, "Maximum input length in tokens (default: 1024).")
    max_target_length: Optional[int] = _arg(None, "Maximum training target length in tokens (default: 128).")
    val_max_target_length: Optional[int] = _arg(None, "Maximum generated length at evaluation (default: max_target_length).")
    # decoding (HF's generation argument names; --seed, HF's, seeds the draws)
    do_sample: bool = _arg(False, "Sample at evaluation instead of greedy decoding (every exit method; with "
                           "self-speculation the full model's distribution is kept). Draws are seeded by --seed.")
    temperature: Optional[float] = _arg(None, "With --do_sample: softmax temperature (default: the model's "
                                        "generation_config, else 1.0).")
    top_k: Optional[int] = _arg(None, "With --do_sample: keep the k most likely tokens, 0 for all (default: the "
                                "model's generation_config, else 50).")
    top_p: Optional[float] = _arg(None, "With --do_sample: nucleus sampling mass (default: the model's "
                                  "generation_config, else 1.0).")


EVAL_BATCH_FLAG = "per_device_eval_batch_size"
ARGUMENT_CLASSES = (ModelArguments, DataTrainingArguments, Seq2SeqTrainingArguments, AdditionalArguments)
Arguments = Tuple[ModelArguments, DataTrainingArguments, Seq2SeqTrainingArguments, AdditionalArguments]


def parse_arguments(argv: Optional[List[str]] = None) -> Arguments:
    """Parse the command line, or a single .json file holding every argument."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    if len(argv) == 1 and argv[0].endswith(".json"):
        path = os.path.abspath(argv[0])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"argument file {path} does not exist.")
        parsed = parser.parse_json_file(json_file=path)
        with open(path, encoding="utf-8") as handle:
            given = EVAL_BATCH_FLAG in json.load(handle)
    else:
        parsed = parser.parse_args_into_dataclasses(args=argv)
        given = any(a == f"--{EVAL_BATCH_FLAG}" or a.startswith(f"--{EVAL_BATCH_FLAG}=") for a in argv)
    model_args, data_args, training_args, additional_args = parsed
    if additional_args.deploy_scenario and not given:
        training_args.per_device_eval_batch_size = 1  # the deploy scenario's default: latency, one row at a time
    return model_args, data_args, training_args, additional_args
