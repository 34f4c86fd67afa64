"""What differs between the three tasks: defaults, columns, row checks, input/target text, metric.

Everything else (arguments, loading, training, evaluation, results) is shared in `tasks.runner`.
"""

from typing import Dict, List, Optional, Sequence

from util.metrics import bleu_metrics, rouge_metrics, squad_metrics

# DataTrainingArguments fields read by one task only (None unless the user sets them)
TASK_SPECIFIC_ARGUMENTS = (
    "question_column", "context_column", "answer_column", "max_seq_length", "max_answer_length",
    "text_column", "summary_column", "source_lang", "target_lang",
    "max_source_length", "max_target_length", "val_max_target_length",
)
_LENGTH_ARGUMENTS = ("max_seq_length", "max_answer_length", "max_source_length", "max_target_length",
                     "val_max_target_length")


class TaskAdapter:
    name = ""
    main_metric = ""  # the quality metric of sweeps and static-exit plots
    own_arguments = ()  # task-specific arguments this task reads
    defaults: Dict[str, object] = {}
    reference_column_arg = ""  # the argument naming the column that holds the references
    source_length_arg = "max_source_length"
    target_length_arg = "max_target_length"
    eval_length_arg = "val_max_target_length"

    # ----- arguments ----------------------------------------------------------------------------
    def resolve_arguments(self, data_args) -> None:
        """Reject other tasks' arguments, then fill this task's defaults (in place)."""
        for arg in TASK_SPECIFIC_ARGUMENTS:
            if arg not in self.own_arguments and getattr(data_args, arg) is not None:
                raise ValueError(f"--{arg} is not used by {self.name}; its arguments are: "
                                 f"{', '.join('--' + a for a in self.own_arguments)}.")
        for arg, value in self.dataset_defaults(data_args).items():
            if getattr(data_args, arg) is None:
                setattr(data_args, arg, value)
        for arg, value in self.defaults.items():
            if getattr(data_args, arg) is None:
                setattr(data_args, arg, value)
        if data_args.val_max_target_length is None and "val_max_target_length" in self.own_arguments:
            data_args.val_max_target_length = data_args.max_target_length
        for arg in _LENGTH_ARGUMENTS:
            value = getattr(data_args, arg)
            if value is not None and value < 1:
                raise ValueError(f"--{arg}={value} must be a positive number of tokens.")

    def dataset_defaults(self, data_args) -> Dict[str, object]:
        """Defaults that depend on --dataset_name (columns, configuration)."""
        return {}

    def lengths(self, data_args):
        """(input length, training target length, generated length) in tokens."""
        return (getattr(data_args, self.source_length_arg), getattr(data_args, self.target_length_arg),
                getattr(data_args, self.eval_length_arg))

    # ----- columns and rows ---------------------------------------------------------------------
    def input_columns(self, data_args) -> List[str]:
        raise NotImplementedError

    def reference_column(self, data_args) -> str:
        return getattr(data_args, self.reference_column_arg)

    def check_columns(self, raw_split, data_args) -> bool:
        """Raise if a needed column is absent; return whether the split holds references.

        A test split may come without references: it is then predicted but not scored.
        """
        present = set(raw_split.dataset.column_names)
        needed = list(self.input_columns(data_args))
        reference = self.reference_column(data_args)
        if (raw_split.name != "test" or reference in present) and reference not in needed:
            needed.append(reference)
        missing = [c for c in needed if c not in present]
        if missing:
            raise ValueError(f"{raw_split.source} lacks column(s) {', '.join(missing)} (it has: "
                             f"{', '.join(sorted(present))}); name the right ones with the column arguments.")
        return reference in present

    def check_rows(self, raw_split, data_args, with_references: bool) -> None:
        for index, row in enumerate(raw_split.dataset):
            problem = self.row_problem(row, data_args, with_references)
            if problem:
                label = f"row {index}" + (f" (id {row['id']})" if row.get("id") is not None else "")
                raise ValueError(f"{raw_split.source}: {label}: {problem}.")

    def row_problem(self, row, data_args, with_references: bool) -> Optional[str]:
        """What is wrong with one row, or None."""
        raise NotImplementedError

    # ----- texts and metric ---------------------------------------------------------------------
    def source_text(self, row, data_args) -> str:
        """The model input, with the task prefix."""
        raise NotImplementedError

    def references(self, row, data_args) -> List[str]:
        raise NotImplementedError

    def target_text(self, row, data_args) -> str:
        """The training target: the first reference."""
        return self.references(row, data_args)[0]

    def compute_metrics(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> Dict[str, float]:
        raise NotImplementedError


def _not_text(row, column) -> Optional[str]:
    value = row.get(column)
    if not isinstance(value, str):
        return f"column '{column}' holds {type(value).__name__} {value!r}, not text"
    return None


# ----- question answering ---------------------------------------------------------------------------
def answer_lists(value):
    """(texts, starts) from HF's {"text": [...], "answer_start": [...]} or SQuAD's [{"text", "answer_start"}]."""
    if isinstance(value, dict) and isinstance(value.get("text"), list):
        return value["text"], value.get("answer_start")
    if isinstance(value, list) and all(isinstance(a, dict) and "text" in a for a in value):
        return [a["text"] for a in value], [a.get("answer_start") for a in value]
    return None, None


class QuestionAnswering(TaskAdapter):
    name = "question answering"
    main_metric = "f1"
    own_arguments = ("question_column", "context_column", "answer_column", "max_seq_length", "max_answer_length")
    defaults = {"question_column": "question", "context_column": "context", "answer_column": "answers",
                "max_seq_length": 384, "max_answer_length": 30, "source_prefix": ""}
    reference_column_arg = "answer_column"
    source_length_arg = "max_seq_length"
    target_length_arg = "max_answer_length"
    eval_length_arg = "max_answer_length"

    def input_columns(self, data_args):
        return [data_args.question_column, data_args.context_column]

    def row_problem(self, row, data_args, with_references):
        problem = _not_text(row, data_args.question_column) or _not_text(row, data_args.context_column)
        if problem or not with_references:
            return problem
        texts, starts = answer_lists(row.get(data_args.answer_column))
        if texts is None:
            return f"column '{data_args.answer_column}' must hold {{\"text\": [...], \"answer_start\": [...]}}"
        if not texts:
            return "the question has no answer"
        if starts is not None and len(starts) != len(texts):
            return f"{len(texts)} answer texts but {len(starts)} answer_start values"
        context = row[data_args.context_column]
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                return f"answer {i} is {text!r}, not text"
            start = None if starts is None else starts[i]
            if start is None:
                continue
            found = context[start : start + len(text)] if isinstance(start, int) and start >= 0 else None
            if found != text:
                return f"answer {text!r} is not at answer_start {start!r} of its context (found {found!r} there)"
        return None

    def source_text(self, row, data_args):
        question = row[data_args.question_column].strip()
        context = row[data_args.context_column].strip()
        return f"{data_args.source_prefix}question: {question} context: {context}"

    def references(self, row, data_args):
        texts, _ = answer_lists(row[data_args.answer_column])
        return list(texts)

    def compute_metrics(self, predictions, references):
        return squad_metrics(predictions, references)


# ----- summarization --------------------------------------------------------------------------------
# (document column, summary column, configuration) of the Hub datasets the scripts use
SUMMARIZATION_DATASETS = {
    "samsum": ("dialogue", "summary", None),
    "cnn_dailymail": ("article", "highlights", "3.0.0"),
    "xsum": ("document", "summary", None),
    "multi_news": ("document", "summary", None),
    "big_patent": ("description", "abstract", None),
}


class Summarization(TaskAdapter):
    name = "summarization"
    main_metric = "rougeL"
    own_arguments = ("text_column", "summary_column", "max_source_length", "max_target_length", "val_max_target_length")
    defaults = {"text_column": "text", "summary_column": "summary", "max_source_length": 1024,
                "max_target_length": 128, "source_prefix": "summarize: "}
    reference_column_arg = "summary_column"

    def dataset_defaults(self, data_args):
        known = SUMMARIZATION_DATASETS.get((data_args.dataset_name or "").split("/")[-1])
        if known is None:
            return {}
        text, summary, config = known
        return {"text_column": text, "summary_column": summary, "dataset_config_name": config}

    def input_columns(self, data_args):
        return [data_args.text_column]

    def row_problem(self, row, data_args, with_references):
        problem = _not_text(row, data_args.text_column)
        if problem or not with_references:
            return problem
        return _not_text(row, data_args.summary_column)

    def source_text(self, row, data_args):
        return data_args.source_prefix + row[data_args.text_column].strip()

    def references(self, row, data_args):
        return [row[data_args.summary_column].strip()]

    def compute_metrics(self, predictions, references):
        return rouge_metrics(predictions, [r[0] for r in references])


# ----- translation ----------------------------------------------------------------------------------
LANGUAGE_NAMES = {"en": "English", "de": "German", "fr": "French", "ro": "Romanian", "it": "Italian",
                  "nl": "Dutch", "zh": "Chinese", "ja": "Japanese", "ko": "Korean", "ar": "Arabic"}
TRANSLATION_COLUMN = "translation"  # rows hold {"translation": {source_lang: ..., target_lang: ...}}


class Translation(TaskAdapter):
    name = "translation"
    main_metric = "bleu"
    own_arguments = ("source_lang", "target_lang", "max_source_length", "max_target_length", "val_max_target_length")
    defaults = {"max_source_length": 1024, "max_target_length": 128}

    def resolve_arguments(self, data_args):
        if not data_args.source_lang or not data_args.target_lang:
            raise ValueError("translation needs --source_lang and --target_lang (keys of the translation column, e.g. de en).")
        if data_args.source_prefix is None:
            source = LANGUAGE_NAMES.get(data_args.source_lang, data_args.source_lang)
            target = LANGUAGE_NAMES.get(data_args.target_lang, data_args.target_lang)
            data_args.source_prefix = f"translate {source} to {target}: "  # T5's prefix
        super().resolve_arguments(data_args)

    def dataset_defaults(self, data_args):
        if (data_args.dataset_name or "").split("/")[-1] == "iwslt2017":
            return {"dataset_config_name": f"iwslt2017-{data_args.source_lang}-{data_args.target_lang}"}
        return {}

    def input_columns(self, data_args):
        return [TRANSLATION_COLUMN]

    def reference_column(self, data_args):
        return TRANSLATION_COLUMN

    def check_columns(self, raw_split, data_args):
        super().check_columns(raw_split, data_args)
        # the target language sits in the same column: references are there when it is
        first = raw_split.dataset[0].get(TRANSLATION_COLUMN)
        return raw_split.name != "test" or (isinstance(first, dict) and first.get(data_args.target_lang) is not None)

    def row_problem(self, row, data_args, with_references):
        pair = row.get(TRANSLATION_COLUMN)
        if not isinstance(pair, dict):
            return f"column '{TRANSLATION_COLUMN}' must hold {{\"{data_args.source_lang}\": ..., \"{data_args.target_lang}\": ...}}"
        languages = [data_args.source_lang] + ([data_args.target_lang] if with_references else [])
        for language in languages:
            if not isinstance(pair.get(language), str):
                return f"column '{TRANSLATION_COLUMN}' has no '{language}' text (keys: {', '.join(sorted(pair))})"
        return None

    def source_text(self, row, data_args):
        return data_args.source_prefix + row[TRANSLATION_COLUMN][data_args.source_lang].strip()

    def references(self, row, data_args):
        return [row[TRANSLATION_COLUMN][data_args.target_lang].strip()]

    def compute_metrics(self, predictions, references):
        return bleu_metrics(predictions, references)
