"""Loading the raw splits: local json / jsonl / csv / SQuAD nested json files, or a Hub dataset.

Every problem with the data (a missing or unreadable file, an unknown format, an empty split, a
split the dataset lacks) raises FileNotFoundError or ValueError naming the argument and the file,
before any model is loaded.
"""

import csv
import json
import os
from dataclasses import dataclass
from typing import Dict, List

import datasets

# split name -> (the --do_* flag that needs it, its local-file argument, its sample limit)
SPLITS = {
    "train": ("do_train", "train_file", "max_train_samples"),
    "validation": ("do_eval", "validation_file", "max_eval_samples"),
    "test": ("do_predict", "test_file", "max_predict_samples"),
}
FILE_FORMATS = ("json", "jsonl", "csv")


@dataclass
class RawSplit:
    name: str  # train, validation or test
    dataset: datasets.Dataset
    source: str  # where the rows came from, for error messages


def wanted_splits(training_args) -> List[str]:
    """The splits the --do_* flags ask for, in order."""
    splits = [name for name, (flag, _, _) in SPLITS.items() if getattr(training_args, flag)]
    if not splits:
        raise ValueError("nothing to do: pass at least one of --do_train, --do_eval, --do_predict.")
    return splits


def check_data_arguments(data_args, splits: List[str]) -> None:
    """Data source and sample limits are coherent; every local file named exists and is readable."""
    files = {arg: getattr(data_args, arg) for _, arg, _ in SPLITS.values() if getattr(data_args, arg)}
    if data_args.dataset_name and files:
        raise ValueError(f"pass either --dataset_name or local files ({', '.join('--' + a for a in files)}), not both.")
    for split in splits:
        flag, file_arg, limit_arg = SPLITS[split]
        if not data_args.dataset_name and not getattr(data_args, file_arg):
            raise ValueError(f"--{flag} needs data: pass --{file_arg} or --dataset_name.")
        limit = getattr(data_args, limit_arg)
        if limit is not None and limit < 1:
            raise ValueError(f"--{limit_arg}={limit} must be a positive number of rows.")
    for arg, path in files.items():
        _check_file(arg, path)


def _file_format(path: str) -> str:
    return os.path.splitext(path)[1].lower().lstrip(".")


def _check_file(arg: str, path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"--{arg} {path} does not exist.")
    if not os.path.isfile(path):
        raise ValueError(f"--{arg} {path} is not a file.")
    if _file_format(path) not in FILE_FORMATS:
        raise ValueError(f"--{arg} {path}: unknown format; use one of {', '.join('.' + f for f in FILE_FORMATS)}.")
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as error:
        raise ValueError(f"--{arg} {path} cannot be read: {error}.") from error


# ----- local files ------------------------------------------------------------------------------
def read_rows(path: str, arg: str = "file") -> List[dict]:
    """The rows (dicts) of a local json, jsonl, csv or SQuAD-format file."""
    try:
        if _file_format(path) == "csv":
            with open(path, newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
        else:
            with open(path, encoding="utf-8") as handle:
                rows = _json_rows(handle.read())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as error:
        raise ValueError(f"--{arg} {path} cannot be read: {error}") from error
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"--{arg} {path}: row {index} is a {type(row).__name__}, not an object of columns.")
    return rows


def _json_rows(text: str) -> List[dict]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        # HF's examples name JSON-lines files .json too
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(document, list):
        return document
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        data = document["data"]
        if data and all(isinstance(a, dict) and "paragraphs" in a for a in data):
            return flatten_squad(data)
        return data
    if isinstance(document, dict):
        return [document]  # a JSON-lines file of one row
    raise ValueError("expected a list of rows, JSON lines, or SQuAD's {\"data\": [...]} layout")


def flatten_squad(articles: List[dict]) -> List[dict]:
    """SQuAD's data -> paragraphs -> qas nesting as flat rows with HF's squad columns."""
    rows = []
    for article in articles:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = qa.get("answers", [])
                rows.append({
                    "id": str(qa.get("id", len(rows))),
                    "title": article.get("title", ""),
                    "context": paragraph["context"],
                    "question": qa["question"],
                    "answers": {
                        "text": [a["text"] for a in answers],
                        "answer_start": [a["answer_start"] for a in answers],
                    },
                })
    return rows


def _local_split(path: str, arg: str) -> datasets.Dataset:
    rows = read_rows(path, arg)
    if not rows:
        raise ValueError(f"--{arg} {path} holds no rows: the split is empty.")
    try:
        return datasets.Dataset.from_list(rows)
    except Exception as error:  # pyarrow's type errors are not one class
        raise ValueError(f"--{arg} {path}: rows do not share column types ({error}).") from error


# ----- the Hub ----------------------------------------------------------------------------------
def _hub_dataset(data_args, cache_dir):
    name, config = data_args.dataset_name, data_args.dataset_config_name
    try:
        return datasets.load_dataset(name, config, cache_dir=cache_dir)
    except Exception as error:  # network, missing repo or config: all need the same advice
        raise ValueError(
            f"could not load --dataset_name {name}"
            f"{' --dataset_config_name ' + config if config else ''} from the HuggingFace Hub "
            f"({type(error).__name__}: {error}). Without network access, pass local files with "
            "--train_file / --validation_file / --test_file (json, jsonl, csv or SQuAD json)."
        ) from error


def load_raw_splits(data_args, splits: List[str], cache_dir=None) -> Dict[str, RawSplit]:
    """The requested splits, each cut to its --max_*_samples; none may be empty."""
    hub = _hub_dataset(data_args, cache_dir) if data_args.dataset_name else None
    loaded = {}
    for split in splits:
        _, file_arg, limit_arg = SPLITS[split]
        if hub is not None:
            if split not in hub:
                raise ValueError(f"dataset {data_args.dataset_name} has no '{split}' split (it has: "
                                 f"{', '.join(hub)}); pass --{file_arg} instead.")
            dataset, source = hub[split], f"split '{split}' of {data_args.dataset_name}"
        else:
            path = getattr(data_args, file_arg)
            dataset, source = _local_split(path, file_arg), f"--{file_arg} {path}"
        if len(dataset) == 0:
            raise ValueError(f"{source} is empty.")
        limit = getattr(data_args, limit_arg)
        if limit is not None and limit < len(dataset):
            dataset = dataset.select(range(limit))
        loaded[split] = RawSplit(split, dataset, source)
    return loaded
