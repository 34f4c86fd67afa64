"""The shared pipeline of the task scripts: check inputs, train, evaluate, write results.

    results = run(Summarization(), ["--model_name_or_path", path, "--do_eval", ...])

Order matters: every check of arguments, output directory, tokenizer, config, flags and data
happens before the model is loaded, so bad input fails in seconds with a clear message.
Training uses HF's Seq2SeqTrainer; evaluation is our own loop: batched HF `generate` for
quality, or (`--deploy_scenario True`) the early-exit decoder, `--per_device_eval_batch_size` rows
at once (1 by default there; the same tokens and exit layers at any size, up to summation order),
which also reports speed and exit statistics.

Decoder-only models (Llama, Mistral, Qwen2/3, Gemma 3, GPT-2) take the same path with a prompt
per source (`--prompt_template`, tasks.prompts): trained by HF's Trainer on prompt + target with
the prompt masked out of the loss, evaluated on the new tokens after the left-padded prompt.
"""

import functools
import json
import logging
import os
import platform
import sys
import time
from collections import defaultdict
from dataclasses import asdict, replace
from typing import Dict, List, Optional, Tuple

import torch
import transformers
from tqdm import tqdm
from transformers import (AutoConfig, AutoTokenizer, DataCollatorForSeq2Seq, LongT5ForConditionalGeneration,
                          MT5ForConditionalGeneration, Seq2SeqTrainer, T5ForConditionalGeneration, Trainer, set_seed)
from transformers.training_args import ParallelMode

from models.deploying_causal import CAUSAL_DEPLOY_CLASSES
from models.modeling_causal import TRAIN_CLASSES as CAUSAL_TRAIN_CLASSES
from models.deploying_longt5 import DeployLongT5ForConditionalGeneration
from models.deploying_mt5 import DeployMT5ForConditionalGeneration
from models.deploying_t5 import DeployT5ForConditionalGeneration
from models.gguf_cache import check_gguf_file, gguf_path, resolve_model_path
from models.modeling_longt5 import TrainLongT5ForConditionalGeneration
from models.modeling_mt5 import TrainMT5ForConditionalGeneration
from models.exit_training import CurriculumCallback
from models.modeling_t5 import TrainT5ForConditionalGeneration, merged_for_saving, prepare_for_training
from models.results import SUMMED_COUNTS
from models.sampling import SamplingConfig
from models.self_speculation import speculation_rates
from tasks import distributed
from tasks.adapters import LANGUAGE_NAMES
from tasks.arguments import parse_arguments
from tasks.data import check_data_arguments, load_raw_splits, wanted_splits
from tasks.diagnostics import check_plots_dirs, static_exit_metrics, write_diagnostics
from tasks.prompts import PromptFormat, causal_features, check_template, default_template, max_positions, prompt_format
from util.additional_args import update_autoconfig

logger = logging.getLogger(__name__)

TOKENIZER_PROBE = "The river flows past the mill."
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# flags that change how tokens are decoded: only the deploy decoder honours them
DECODING_FLAGS = ("static_exit_layer", "use_early_exit", "use_shallow_deep", "type_vocab_reduct", "count_flops")
# traces only the deploy decoder records
RECORDING_FLAGS = ("plotting_logits", "render_jsds")
# split -> prefix of its metric names and result files (HF's convention)
SPLIT_PREFIX = {"train": "train", "validation": "eval", "test": "predict"}
CONFIG_FILE = "run_config.json"
ALL_RESULTS_FILE = "all_results.json"


# checkpoint config's model_type -> (training, deploy, plain HF) classes; Flan-T5 is "t5"
MODEL_CLASSES = {
    "t5": (TrainT5ForConditionalGeneration, DeployT5ForConditionalGeneration, T5ForConditionalGeneration),
    "mt5": (TrainMT5ForConditionalGeneration, DeployMT5ForConditionalGeneration, MT5ForConditionalGeneration),
    "longt5": (TrainLongT5ForConditionalGeneration, DeployLongT5ForConditionalGeneration,
               LongT5ForConditionalGeneration),
}
# decoder-only types: (deploy, HF's plain) classes; their training classes are CAUSAL_TRAIN_CLASSES
DECODER_ONLY_CLASSES = CAUSAL_DEPLOY_CLASSES
# T5-family types refused, and why
UNSUPPORTED_MODEL_TYPES = {
    "umt5": "UMT5 gives every decoder block its own relative position bias, while the early-exit decoder "
            "(like T5) computes it in block 0 and shares it",
}


def model_class(training: bool, deploy: bool, model_type: str = "t5"):
    """The model class of each stage and model type, chosen here only."""
    if model_type in DECODER_ONLY_CLASSES:
        deploy_class, plain_class = DECODER_ONLY_CLASSES[model_type]
        if training:
            return CAUSAL_TRAIN_CLASSES[model_type]
        return deploy_class if deploy else plain_class
    check_model_type(model_type, "model_type", model_type)
    train_class, deploy_class, plain_class = MODEL_CLASSES[model_type]
    if training:
        return train_class  # adds the intermediate-layer and meta-head losses
    return deploy_class if deploy else plain_class


def check_model_type(model_type: str, arg: str, source: str) -> None:
    if model_type in MODEL_CLASSES or model_type in DECODER_ONLY_CLASSES:
        return
    why = UNSUPPORTED_MODEL_TYPES.get(model_type)
    reason = f": {why}" if why else ""
    raise ValueError(f"{arg} {source} is a '{model_type}' model, which these scripts do not support{reason}. "
                     f"Supported model types: {', '.join(sorted(MODEL_CLASSES))}; decoder-only: "
                     f"{', '.join(sorted(DECODER_ONLY_CLASSES))}.")


def is_decoder_only(config) -> bool:
    return config.model_type in DECODER_ONLY_CLASSES


def resolve_prompts(task, data_args, training_args, config, tokenizer, splits: List[str],
                    prefix_given: bool) -> Dict[str, PromptFormat]:
    """Decoder-only models: the prompt of training ("train") and of decoding ("eval"), each within
    the model's context less its target's room; T5-family models: none (a template is an error).
    Raises before any work when the template leaves no room for the source."""
    if not is_decoder_only(config):
        if data_args.prompt_template is not None:
            raise ValueError(f"--prompt_template formats the prompts of decoder-only models; this is a "
                             f"'{config.model_type}' model, which reads --source_prefix instead.")
        return {}
    if prefix_given:
        raise ValueError("--source_prefix is T5's task prefix; a decoder-only model's prompt is "
                         "--prompt_template (put the instruction there).")
    data_args.source_prefix = ""  # the template carries the instruction
    if data_args.prompt_template is None:
        languages = [LANGUAGE_NAMES.get(code, code) for code in (data_args.source_lang, data_args.target_lang)
                     if code]
        data_args.prompt_template = default_template(task.name, *languages)
    source_length, target_length, _ = task.lengths(data_args)
    context = max_positions(config)
    rooms = {"train": (target_length, f"--{task.target_length_arg}"),
             "eval": (new_token_budget(task, data_args, training_args), "the generated length")}
    needed = {"train": "train" in splits, "eval": any(split != "train" for split in splits)}
    prompts = {}
    for stage, (room, name) in rooms.items():
        if not needed[stage]:
            continue
        budget = min(source_length, context - room)
        why = f"--{task.source_length_arg} {source_length}, or the context of {context} positions less " \
              f"{room} tokens for {name}"
        prompts[stage] = prompt_format(tokenizer, data_args.prompt_template, budget, why)
    return prompts


# ----- checks ----------------------------------------------------------------------------------
SAMPLING_FLAGS = ("temperature", "top_k", "top_p")  # generate()'s names, with --do_sample


def check_sampling_arguments(data_args) -> None:
    """--temperature, --top_k and --top_p only apply with --do_sample; their values are HF's."""
    given = [f"--{name}" for name in SAMPLING_FLAGS if getattr(data_args, name) is not None]
    if given and not data_args.do_sample:
        raise ValueError(f"{', '.join(given)} only apply with --do_sample True (greedy decoding would ignore them).")
    if data_args.do_sample:
        SamplingConfig.resolve(None, *(getattr(data_args, name) for name in SAMPLING_FLAGS))


def sampling_options(data_args) -> dict:
    """generate()'s sampling arguments, and the values decoding uses (recorded in the results)."""
    if not data_args.do_sample:
        return {}
    return {"do_sample": True, **{name: getattr(data_args, name) for name in SAMPLING_FLAGS}}


def check_run_arguments(training_args, additional_args, alone: bool = False) -> None:
    beams = training_args.generation_num_beams
    if additional_args.deploy_scenario and beams not in (None, 1):
        raise ValueError(f"--generation_num_beams={beams}: --deploy_scenario does not support beam search (early exit "
                         "decides per token, a beam search per hypothesis); it must be 1.")
    if not additional_args.deploy_scenario:
        for flag in DECODING_FLAGS:
            if getattr(additional_args, flag) not in (None, False):
                raise ValueError(f"--{flag} changes decoding, which only --deploy_scenario True does; "
                                 "batched evaluation runs the full model.")
        for flag in RECORDING_FLAGS:
            if getattr(additional_args, flag):
                raise ValueError(f"--{flag} records traces of the deploy decoder: set --deploy_scenario True "
                                 "(batched evaluation would ignore it).")
    if training_args.eval_strategy != "no":
        raise ValueError("--eval_strategy must stay 'no': evaluation runs after training, with --do_eval.")
    processes = distributed.launched_processes(alone)
    if processes > 1 and training_args.parallel_mode != ParallelMode.DISTRIBUTED:
        raise ValueError(f"launched as {processes} processes, but they would not join one process group: "
                         "without a GPU, pass --use_cpu True so that they train and evaluate together over gloo.")
    distributed.check_arguments(processes, training_args, additional_args)


def run_files(output_dir: str) -> List[str]:
    """Files a run writes into output_dir (results, predictions, configuration)."""
    names = [CONFIG_FILE, ALL_RESULTS_FILE]
    for prefix in SPLIT_PREFIX.values():
        names += [f"{prefix}_results.json", f"{prefix}_predictions.jsonl"]
    return [os.path.join(output_dir, n) for n in names]


def check_output_dir(output_dir: Optional[str], overwrite: bool) -> None:
    """Refuse an output_dir that holds anything (another run's results?) unless --overwrite_output_dir."""
    if not output_dir:
        raise ValueError("--output_dir is required: results, predictions and the configuration go there.")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output_dir {output_dir} is a file, not a directory.")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ValueError(f"--output_dir {output_dir} is not empty: it may hold another run's results. "
                         "Choose a new directory or pass --overwrite_output_dir.")


def prepare_output_dir(output_dir: str) -> None:
    """Create output_dir, removing an earlier run's result files so none is mixed with the new ones."""
    for path in run_files(output_dir):
        if os.path.isfile(path):
            os.remove(path)
    os.makedirs(output_dir, exist_ok=True)


def _hub_advice(arg: str, source: str, what: str, error: Exception) -> str:
    where = "a local directory" if os.path.isdir(source) else "not a local directory, and"
    return (f"{arg} {source}: {where} the {what} could not be loaded ({type(error).__name__}: {error}). "
            "Without network access to the HuggingFace Hub, pass a local directory.")


def load_tokenizer(model_args):
    arg = "--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path"
    source = model_args.tokenizer_name or model_args.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, cache_dir=model_args.cache_dir, revision=model_args.model_revision)
    except Exception as error:  # transformers raises OSError, ValueError or Hub errors alike
        raise ValueError(_hub_advice(arg, source, "tokenizer", error)) from error
    # decided by what loaded, not by file names (ByT5 saves no vocabulary file): a folder with a
    # T5 config but no tokenizer files loads an empty T5 tokenizer that knows no word
    ids = tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    if not tokenizer.decode([i for i in ids if i != tokenizer.unk_token_id], skip_special_tokens=True).strip():
        raise ValueError(f"{arg} {source} holds no tokenizer (the one it loads knows no word of {TOKENIZER_PROBE!r}): "
                         "copy the model's tokenizer files there or pass --tokenizer_name with a directory that has them.")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{arg} {source}: the tokenizer needs an eos token, as T5's has.")
    return tokenizer


def check_pad_token(tokenizer, config, model_args) -> None:
    """T5-family tokenizers need their pad token; a decoder-only one without (Llama, GPT-2) pads
    with its end token, as is usual for these models (finished rows are padded with it)."""
    if tokenizer.pad_token_id is not None:
        return
    if is_decoder_only(config):
        tokenizer.pad_token = tokenizer.eos_token
        return
    source = model_args.tokenizer_name or model_args.model_name_or_path
    arg = "--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path"
    raise ValueError(f"{arg} {source}: the tokenizer needs a pad and an eos token, as T5's has.")


def load_config(model_args, tokenizer, additional_args):
    """The model config, checked against the tokenizer, with the method flags validated into it."""
    model_path = model_args.model_name_or_path
    if os.path.isdir(model_path) and not any(os.path.isfile(os.path.join(model_path, f)) for f in WEIGHT_FILES):
        raise ValueError(f"--model_name_or_path {model_path} holds no model weights ({', '.join(WEIGHT_FILES)}).")
    arg = "--config_name" if model_args.config_name else "--model_name_or_path"
    source = model_args.config_name or model_path
    try:
        config = AutoConfig.from_pretrained(source, cache_dir=model_args.cache_dir, revision=model_args.model_revision)
    except Exception as error:
        raise ValueError(_hub_advice(arg, source, "config", error)) from error
    check_model_type(config.model_type, arg, source)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model only {config.vocab_size}: "
                         "they do not belong together (check --tokenizer_name).")
    return update_autoconfig(config, additional_args)


# ----- model inputs ------------------------------------------------------------------------------
def _rows(batch: Dict[str, list]) -> List[dict]:
    return [dict(zip(batch, values)) for values in zip(*batch.values())]


def training_features(task, dataset, tokenizer, data_args, num_workers=None):
    """Tokenised inputs and labels of the training split."""
    source_length, target_length, _ = task.lengths(data_args)

    def encode(batch):
        rows = _rows(batch)
        features = tokenizer([task.source_text(r, data_args) for r in rows], max_length=source_length, truncation=True)
        targets = tokenizer(text_target=[task.target_text(r, data_args) for r in rows],
                            max_length=target_length, truncation=True)
        features["labels"] = targets["input_ids"]
        return features

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, num_proc=num_workers,
                       desc="Tokenising the training split")


def causal_training_features(task, dataset, tokenizer, data_args, prompt: PromptFormat, num_workers=None):
    """Tokenised prompt + target rows of the training split (the prompt masked in the labels),
    and how many sources were cut to fit the context."""
    target_length = task.lengths(data_args)[1]

    def encode(batch):
        rows = _rows(batch)
        features, cut = causal_features(prompt, tokenizer, [task.source_text(r, data_args) for r in rows],
                                        [task.target_text(r, data_args) for r in rows], target_length)
        features["source_cut"] = cut
        return features

    features = dataset.map(encode, batched=True, remove_columns=dataset.column_names, num_proc=num_workers,
                           desc="Tokenising the training split")
    cut = sum(features["source_cut"])
    return features.remove_columns("source_cut"), cut


# ----- training -------------------------------------------------------------------------------------
def train(task, model_args, data_args, training_args, config, tokenizer, raw_split,
          prompt: Optional[PromptFormat] = None) -> dict:
    """Fine-tune, save model and tokenizer to output_dir, return the train_* metrics. With `prompt`
    (decoder-only models): HF's Trainer on prompt + target, the loss over the target only."""
    model = model_class(training=True, deploy=False, model_type=config.model_type).from_pretrained(
        model_args.model_name_or_path, config=config, cache_dir=model_args.cache_dir, revision=model_args.model_revision)
    model = prepare_for_training(model)  # LoRA adapters, or everything but the meta head frozen
    workers = data_args.preprocessing_num_workers
    if prompt is None:
        features, cut = training_features(task, raw_split.dataset, tokenizer, data_args, workers), None
        trainer_class, collator = Seq2SeqTrainer, DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)
    else:
        features, cut = causal_training_features(task, raw_split.dataset, tokenizer, data_args, prompt, workers)
        # right padding in training: HF's causal LMs number positions from the left edge
        tokenizer.padding_side = "right"
        trainer_class, collator = Trainer, DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=features,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[CurriculumCallback()],  # the step and total, for LayerSkip's curriculum
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.model = merged_for_saving(trainer.model)  # LoRA merged: the checkpoint is a plain model
    if prompt is not None:
        tokenizer.padding_side = "left"  # as the checkpoint's users decode with it
    trainer.save_model()  # model, config (with the flags) and tokenizer
    metrics = dict(result.metrics)
    metrics["train_samples"] = len(features)
    if cut is not None:
        metrics["train_truncated_sources"] = cut
    return metrics


# ----- evaluation -------------------------------------------------------------------------------------
class ExitStatsTotals:
    """Sums the deploy model's per-call exit_stats over samples. Block figures are summed as
    integers, so the totals do not depend on how the samples were grouped into calls."""

    def __init__(self):
        self.samples = 0
        self.tokens = 0
        self.exit_layer_sum = 0  # FREE's accounting (exit layer per token)
        self.block_op: List[int] = []
        self.exit_layer_counts: List[int] = []
        self.sums = defaultdict(float)  # time_* and flops_* figures, FREE's token counts
        self._traces: Dict[int, dict] = {}  # plotting_logits: sample index -> its trace
        self._jsd_steps: Dict[int, List[dict]] = {}  # render_jsds: sample index -> one per generated token
        self.last = {}  # figures that are states, not sums (the adaptive threshold)

    @property
    def layer_traces(self) -> List[dict]:
        """One per traced sample, in dataset order."""
        return [self._traces[i] for i in sorted(self._traces)]

    @property
    def jsd_steps(self) -> List[dict]:
        """One per generated token, in dataset order."""
        return [step for i in sorted(self._jsd_steps) for step in self._jsd_steps[i]]

    def add(self, stats: dict, indices: Optional[List[int]] = None) -> None:
        """One call's exit_stats; `indices` are its rows' sample indices (by default the next ones)."""
        rows = len(stats["exit_layers"])  # one call decodes a batch of samples
        if indices is None:
            indices = list(range(self.samples, self.samples + rows))
        self.samples += rows
        self.tokens += stats["tokens"]
        self.exit_layer_sum += sum(sum(layers) for layers in stats["exit_layers"])
        self.block_op = _add_lists(self.block_op, stats["block_op"])
        self.exit_layer_counts = _add_lists(self.exit_layer_counts, stats["exit_layer_counts"])
        for key, value in stats.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if numeric and (key.startswith("time_") or key.startswith("flops_") or key in SUMMED_COUNTS):
                self.sums[key] += value
        if "adaptive_threshold" in stats:
            self.last["adaptive_threshold"] = stats["adaptive_threshold"]
        for index, trace in zip(indices, stats.get("layer_traces", [])):
            if trace:
                self._traces[index] = trace
        for index, steps in zip(indices, stats.get("jsd_steps", [])):
            self._jsd_steps[index] = steps

    def metrics(self) -> dict:
        out = {
            "block_avg": sum(self.block_op) / self.tokens if self.tokens else 0.0,
            "block_avg_free": self.exit_layer_sum / self.tokens if self.tokens else 0.0,
            "block_op": self.block_op,
            "exit_layer_counts": self.exit_layer_counts,
            "tokens": self.tokens,
        }
        out.update(self.last)
        if "drafted_tokens" in self.sums:  # self-speculation: its rates over all samples, not their mean
            out.update(speculation_rates(self.sums))
        for key, total in sorted(self.sums.items()):
            out[key] = total
            if key.startswith("flops_"):
                out[f"{key}_per_sample"] = total / self.samples if self.samples else 0.0
        return out


def _add_lists(total: List[int], more: List[int]) -> List[int]:
    if not total:
        return list(more)
    if len(total) != len(more):
        raise ValueError(f"per-layer statistics changed length ({len(total)} then {len(more)}).")
    return [a + b for a, b in zip(total, more)]


def load_eval_model(model_path: str, config, deploy: bool, model_args, device):
    cls = model_class(training=False, deploy=deploy, model_type=config.model_type)
    model = cls.from_pretrained(model_path, config=config, cache_dir=model_args.cache_dir, revision=model_args.model_revision)
    return model.to(device).eval()


def generate_predictions(model, tokenizer, sources: List[str], source_length: int, max_new_tokens: int,
                         num_beams: int, batch_size: int, stats: Optional[ExitStatsTotals] = None,
                         show_progress: bool = True, exit_args=None, desc: str = "Generating", position: int = 0,
                         by_length: bool = False, sampling: Optional[dict] = None,
                         prompt: Optional[PromptFormat] = None):
    """(texts, generated lengths, exit layers per sample or None) for every source, in order.

    With `stats`, each call's exit_stats are collected (the deploy model, decoding with the flags
    `exit_args`; its rows decode as they would alone, so only timings depend on the batch size).
    `by_length`: batches are formed from sources of similar length, longest first (less padding,
    and rows that tend to end together: a batch steps until its longest row ends); every result
    still comes back in the sources' order. A failing generate call stops the run: a missing
    prediction is never scored as an answer. `sampling`: generate's do_sample, temperature, top_k
    and top_p (draws from torch's global generator, seeded by the caller).
    With `prompt` (decoder-only models) each source is
    put in its prompt, batches are left-padded and the text is that of the tokens after the prompt.
    """
    options = {} if exit_args is None else {"exit_args": exit_args}
    options.update(sampling or {"do_sample": False})
    count = len(sources)
    texts, lengths, exits = [None] * count, [None] * count, [None] * count
    if prompt is None:
        encoded = tokenizer(sources, max_length=source_length, truncation=True)["input_ids"]  # once, padded per batch
    else:
        encoded = prompt.encode(tokenizer, sources)[0]
        if exit_args is None:
            options["pad_token_id"] = tokenizer.pad_token_id  # HF generate: pads finished rows with it
    order = list(range(count))
    if by_length:
        order.sort(key=lambda i: -len(encoded[i]))  # stable: ties keep the dataset order
    for start in tqdm(range(0, count, batch_size), desc=desc, unit="batch", position=position,
                      disable=not show_progress):
        indices = order[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in indices]}, return_tensors="pt",
                              padding_side="left" if prompt is not None else None).to(model.device)
        with torch.inference_mode():
            ids = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 max_new_tokens=max_new_tokens, num_beams=num_beams, **options)
        if prompt is not None:
            ids = ids[:, batch["input_ids"].shape[1]:]  # generate returns the prompts, then the new tokens
        if stats is not None:
            call = model.exit_stats()
            stats.add(call, indices)
            for i, layers in zip(indices, call["exit_layers"]):
                exits[i] = layers
        decoded = tokenizer.batch_decode(ids, skip_special_tokens=True)
        generated = (ids != tokenizer.pad_token_id).sum(dim=1).tolist()  # as HF's gen_len
        for i, text, n in zip(indices, decoded, generated):
            texts[i], lengths[i] = text.strip(), int(n)
    return texts, lengths, (exits if stats is not None else None)


def new_token_budget(task, data_args, training_args) -> int:
    """Tokens to generate: the generated length itself (max_new_tokens), or one less with
    --length_counts_start_token (HF's max_length, which FREE's QA evaluation passes)."""
    length = training_args.generation_max_length or task.lengths(data_args)[2]
    if not data_args.length_counts_start_token:
        return length
    if length < 2:
        raise ValueError(f"--length_counts_start_token: a generated length of {length} counting the start token "
                         "leaves no token to generate; give at least 2.")
    return length - 1


def evaluate_split(task, raw_split, with_references: bool, model, tokenizer, data_args, training_args,
                   additional_args, stats: Optional[ExitStatsTotals] = None, alone: bool = False,
                   prompt: Optional[PromptFormat] = None) -> Tuple[dict, List[dict]]:
    """Metrics (without prefix) and prediction records of one split (exit statistics into `stats`);
    `alone`: decoded by this process only, whatever the launcher started; `prompt`: a decoder-only
    model's (the count of sources cut to fit its context is reported)."""
    deploy = additional_args.deploy_scenario
    source_length = task.lengths(data_args)[0]
    rows = list(raw_split.dataset)
    sources = [task.source_text(r, data_args) for r in rows]
    if deploy and stats is None:
        stats = ExitStatsTotals()
    sampling = sampling_options(data_args)
    if sampling:  # the draws follow from --seed (each process its own stream): a run is reproducible
        set_seed(training_args.seed + distributed.process_index(training_args, alone))
    distributed.barrier(training_args, alone)  # several processes start decoding together: runtime is the slowest's
    began = time.perf_counter()
    # under torchrun / accelerate launch each process decodes a shard; all get every result, in order
    texts, lengths, exits, per_process = distributed.generate_in_shards(
        functools.partial(generate_predictions, model, tokenizer), sources,
        source_length=source_length,
        max_new_tokens=new_token_budget(task, data_args, training_args),
        num_beams=training_args.generation_num_beams or 1,
        batch_size=training_args.per_device_eval_batch_size,
        # batches of similar lengths, except where decoding order matters: the adaptive threshold
        # refits on every sample decoded before, in dataset order
        by_length=training_args.per_device_eval_batch_size > 1 and not (deploy and additional_args.use_adapt_threshold),
        stats=stats,
        show_progress=not training_args.disable_tqdm,
        exit_args=additional_args if deploy else None,
        processes=distributed.num_processes(training_args, alone),
        rank=distributed.process_index(training_args, alone),
        sampling=sampling,
        prompt=prompt,
    )
    runtime = time.perf_counter() - began

    references = [task.references(r, data_args) for r in rows] if with_references else None
    # once, on the gathered predictions: only process 0 reports them (the others' are not written)
    scoring = with_references and distributed.process_index(training_args, alone) == 0
    metrics = task.compute_metrics(texts, references) if scoring else {}
    metrics["gen_len"] = sum(lengths) / len(lengths)
    metrics["do_sample"] = bool(sampling)
    if sampling:
        resolved = SamplingConfig.resolve(model.generation_config, *(sampling[name] for name in SAMPLING_FLAGS))
        metrics.update(temperature=resolved.temperature, top_k=resolved.top_k, top_p=resolved.top_p,
                       seed=training_args.seed)
    metrics["samples"] = len(rows)
    if prompt is not None:
        metrics["truncated_sources"] = sum(prompt.encode(tokenizer, sources)[1])
    metrics["runtime"] = runtime
    metrics["samples_per_second"] = len(rows) / runtime
    if stats is not None:
        metrics.update(stats.metrics())
        metrics["tokens_per_second"] = stats.tokens / runtime
    metrics.update(per_process)  # several processes: samples and seconds of each

    records = []
    for i, (row, text) in enumerate(zip(rows, texts)):
        record = {"index": i, "id": row.get("id"), "prediction": text}
        if references is not None:
            record["references"] = references[i]
        if exits is not None:
            record["exit_layers"] = exits[i]
        records.append(record)
    return metrics, records


# ----- results ---------------------------------------------------------------------------------------
def _write_json(path: str, data) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def save_results(output_dir: str, prefix: str, metrics: dict, records: Optional[List[dict]] = None) -> dict:
    """Write {prefix}_results.json (and predictions), merge into all_results.json; return the prefixed metrics."""
    prefixed = {f"{prefix}_{k}" if not k.startswith(prefix + "_") else k: v for k, v in metrics.items()}
    _write_json(os.path.join(output_dir, f"{prefix}_results.json"), prefixed)
    if records is not None:
        with open(os.path.join(output_dir, f"{prefix}_predictions.jsonl"), "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    all_path = os.path.join(output_dir, ALL_RESULTS_FILE)
    merged = {}
    if os.path.isfile(all_path):
        with open(all_path, encoding="utf-8") as handle:
            merged = json.load(handle)
    merged.update(prefixed)
    _write_json(all_path, merged)
    return prefixed


def save_run_config(output_dir, task, argv, model_args, data_args, training_args, additional_args) -> None:
    _write_json(os.path.join(output_dir, CONFIG_FILE), {
        "task": task.name,
        "argv": argv,
        "model_args": asdict(model_args),
        "data_args": asdict(data_args),
        "training_args": training_args.to_dict(),
        "additional_args": asdict(additional_args),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
    })


# ----- the pipeline ---------------------------------------------------------------------------------
def run(task, argv: Optional[List[str]] = None, alone: bool = False) -> dict:
    """Parse arguments, check every input, then train / evaluate / predict; return all results.
    `alone`: this process runs by itself even under torchrun (a sweep cell; tasks.distributed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, training_args, additional_args = parse_arguments(argv)
    prefix_given = data_args.source_prefix is not None  # before the task fills its default
    task.resolve_arguments(data_args)
    if data_args.prompt_template is not None:
        check_template(data_args.prompt_template)
    check_run_arguments(training_args, additional_args, alone)
    check_sampling_arguments(data_args)
    if model_args.gguf_file:
        check_gguf_file(gguf_path(model_args.model_name_or_path, model_args.gguf_file))
    splits = wanted_splits(training_args)
    check_data_arguments(data_args, splits)
    new_token_budget(task, data_args, training_args)  # a length that leaves nothing to generate fails here
    output_dir = training_args.output_dir
    # under torchrun / accelerate launch, process 0 alone checks and writes output_dir
    main_process = distributed.process_index(training_args, alone) == 0
    check_output_dir(output_dir, data_args.overwrite_output_dir or not main_process)
    if additional_args.plotting_logits or additional_args.render_jsds:
        check_plots_dirs(output_dir, [SPLIT_PREFIX[s] for s in splits if s != "train"],
                         data_args.overwrite_output_dir or not main_process)
    if model_args.gguf_file:  # every later step loads its converted HF folder (converted once, cached)
        model_args = replace(model_args, model_name_or_path=resolve_model_path(model_args.model_name_or_path,
                                                                               model_args.gguf_file))
    tokenizer = load_tokenizer(model_args)
    config = load_config(model_args, tokenizer, additional_args)
    check_pad_token(tokenizer, config, model_args)
    prompts = resolve_prompts(task, data_args, training_args, config, tokenizer, splits, prefix_given)
    raw = load_raw_splits(data_args, splits, model_args.cache_dir)
    with_references = {}
    for name, raw_split in raw.items():
        with_references[name] = task.check_columns(raw_split, data_args)
        task.check_rows(raw_split, data_args, with_references[name])
    distributed.check_split_sizes(distributed.launched_processes(alone),
                                  {name: len(raw[name].dataset) for name in raw if name != "train"})
    if main_process:
        prepare_output_dir(output_dir)  # every input is valid: only now is anything written
        save_run_config(output_dir, task, argv, model_args, data_args, training_args, additional_args)
    set_seed(training_args.seed)

    results, model_path = {}, model_args.model_name_or_path
    if "train" in raw:
        metrics = train(task, model_args, data_args, training_args, config, tokenizer, raw["train"],
                        prompts.get("train"))
        if main_process:
            results.update(save_results(output_dir, "train", metrics))
        distributed.barrier(training_args, alone)  # process 0 has saved the model the others load
        model_path = output_dir
    evaluated = [s for s in ("validation", "test") if s in raw]  # every process decodes its shard
    if evaluated:
        model = load_eval_model(model_path, config, additional_args.deploy_scenario, model_args, training_args.device)
        for split in evaluated:
            stats = ExitStatsTotals() if additional_args.deploy_scenario else None
            metrics, records = evaluate_split(task, raw[split], with_references[split], model, tokenizer,
                                              data_args, training_args, additional_args, stats, alone,
                                              prompts.get("eval"))
            static = None
            if stats is not None and stats.layer_traces and with_references[split]:
                static = static_exit_metrics(
                    lambda args: evaluate_split(task, raw[split], True, model, tokenizer, data_args,
                                                training_args, args, alone=alone, prompt=prompts.get("eval"))[0],
                    model, task.main_metric)
                metrics[f"static_exit_{task.main_metric}"] = [static[layer] for layer in sorted(static)]
            if not main_process:
                continue
            results.update(save_results(output_dir, SPLIT_PREFIX[split], metrics, records))
            if stats is not None and (stats.layer_traces or stats.jsd_steps):
                write_diagnostics(output_dir, SPLIT_PREFIX[split], stats.layer_traces, stats.jsd_steps, static,
                                  task.main_metric)
            logger.info("%s results: %s", split, {k: v for k, v in metrics.items() if not isinstance(v, list)})
    return results


def main(task, argv: Optional[List[str]] = None) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    run(task, argv)
    distributed.close()  # under torchrun / accelerate launch: before the process exits
