"""Offline demo of early-exit decoding, end to end, on 2 CPU cores.

    make demo                    (or: .venv/bin/python src/demo.py)    the main task, data-to-text
    .venv/bin/python src/demo.py --task qa                              the question-answering demo
    .venv/bin/python src/demo.py --arch llama                           data-to-text, a decoder-only model

1. Generates, from a fixed seed, the task's data (util/demo_data.py): records of invented facts
   and the few sentences that state them, as summarization rows (`--task bio`, the default), or
   a question-answering set in SQuAD's format (`--task qa`).
2. Trains a BPE tokenizer and a small T5 with `weighted_ce` on every decoder layer, through the
   task script's own training (`run_summarization.py` / `run_question_answering.py --do_train`),
   and caches it in cache/demo_bio/ (cache/demo_model/ for qa; a later run with the same settings
   reuses it). `--arch llama`: a small Llama-style decoder-only model instead, trained on
   prompt + target (`--recipe weighted_ce` or LayerSkip's `layerskip`), cached in cache/demo_bio_llama/.
3. Quality: evaluates it through the same task script in the deploy scenario under each row of
   the table (DEMO_ROWS, methods of util/methods.py, and a static exit at every layer), with FLOPs
   counted, decoding `--eval_batch_size` rows at once (the same tokens and exit layers as batch 1,
   up to summation order).
4. Speed: tokens/s of every row at batch 1 on the first `--timing_samples` evaluation rows, the
   rows interleaved in `--timing_rounds` rounds, the median round kept.
5. Prints the table, the issue's targets and a per-token view of the exit layers; writes
   outputs/demo/ (demo_results.json and .md, exit_view.html, plots).
"""

import argparse
import html
import json
import logging
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import datasets
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tasks import runner  # noqa: E402
from tasks.adapters import QuestionAnswering, Summarization  # noqa: E402
from tasks.data import flatten_squad  # noqa: E402
from util.additional_args import AdditionalArguments  # noqa: E402
from util.cli import run_entry_point  # noqa: E402
from util.demo_data import generate_bios, generate_squad, write_jsonl, write_squad  # noqa: E402
from util.methods import method_flags  # noqa: E402
from tasks.prompts import default_template, prompt_format  # noqa: E402
from util.toy_models import SPECIAL_TOKENS, build_toy_llama, build_toy_t5, train_toy_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# (row, METHOD of the table in util/methods.py, its parameters, extra flags): one row of the
# table each; a static exit at every layer below the last is added after the full model.
DEMO_ROWS = [
    ("full model", "full", {}, {}),
    ("early exit, softmax 0.9", "softmax", {}, {}),
    ("early exit, softmax 0.8", "softmax", {"threshold": 0.8}, {}),
    ("early exit, state 0.99", "state", {"threshold": 0.99}, {}),
    ("softmax 0.9, fixed vocabulary", "vocab_fixed", {}, {}),
    ("softmax 0.9, decaying vocabulary", "vocab_decaying", {}, {}),
    ("softmax 0.9, adaptive vocabulary", "vocab_adaptive", {}, {}),
    ("softmax 0.9, decaying + re-ranking", "vocab_decaying_rerank", {}, {}),
    ("contrastive decoding 0.9", "contrastive", {"min_layer": 2}, {}),
    ("reweighted contrastive 0.9", "reweight", {"min_layer": 2}, {}),
    ("JSD contrastive 0.9", "jsd", {"min_layer": 3}, {}),
    ("FREE shallow-deep, layer 2, softmax 0.9", "shallow_deep", {"shallow_layer": 2}, {}),
    ("self-speculation, layer 2, softmax 0.9", "self_speculation", {"shallow_layer": 2}, {}),
    # traces every layer (outputs are the full model's) and draws the plots under plots/diagnostics/
    ("diagnostics", "jsd", {"min_layer": 3}, {"plotting_logits": True, "render_jsds": True}),
]
EARLY = method_flags("softmax")  # early exit, softmax 0.9 from layer 1
TARGET_ROW = "early exit, softmax 0.9"  # the row the speed targets are measured on
LOSSLESS_ROW = "self-speculation, layer 2, softmax 0.9"  # must equal the full model, and be faster
UNTIMED_ROWS = ("diagnostics",)  # traces every layer: its speed is not a method's
VIEW_EXAMPLES = 3  # examples shown token by token with their exit layers


# ----- the tasks ---------------------------------------------------------------------------------
@dataclass
class BioSettings:
    """Data-to-text: everything the cached model depends on (a change retrains it)."""

    train_examples: int = 24000
    eval_examples: int = 200
    min_facts: int = 4
    max_facts: int = 5
    vocab_size: int = 2048
    d_model: int = 128
    d_kv: int = 32
    num_heads: int = 4
    d_ff: int = 512
    encoder_layers: int = 2
    decoder_layers: int = 8
    train_steps: int = 1600
    batch_size: int = 16
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    seed: int = 0


@dataclass
class LlamaBioSettings:
    """Data-to-text with a decoder-only (Llama-style) model: what its cached model depends on."""

    train_examples: int = 24000
    eval_examples: int = 200
    min_facts: int = 4
    max_facts: int = 5
    vocab_size: int = 2048
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2  # grouped-query attention, as Llama's
    intermediate_size: int = 384
    decoder_layers: int = 8  # the model's blocks (it has no encoder)
    max_positions: int = 160
    recipe: str = "weighted_ce"  # or "layerskip" (LayerSkip's early-exit loss and layer dropout)
    train_steps: int = 1600
    batch_size: int = 16
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    seed: int = 0


# the training flags of each recipe (--recipe of the decoder-only demo; T5 trains with weighted_ce)
RECIPES = {
    "weighted_ce": ["--intermediate_loss_fn", "weighted_ce"],
    "layerskip": ["--intermediate_loss_fn", "layerskip", "--early_exit_loss_scale", "1.0",
                  "--early_exit_curriculum", "none", "--layer_dropout_max", "0.1"],
}


@dataclass
class QASettings:
    """Question answering: everything the cached model depends on (a change retrains it)."""

    train_contexts: int = 12000
    eval_contexts: int = 50
    questions_per_context: int = 3
    people: int = 3
    facts_per_person: int = 2
    vocab_size: int = 4096
    d_model: int = 128
    d_kv: int = 32
    num_heads: int = 4
    d_ff: int = 512
    encoder_layers: int = 2
    decoder_layers: int = 6
    train_steps: int = 2500
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    seed: int = 0


def bio_data(settings: BioSettings, folder: Path) -> Dict[str, Path]:
    """Training and evaluation rows (different seeds, one world of names) as summarization jsonl."""
    files = {}
    for split, count, seed in (("train", settings.train_examples, settings.seed),
                               ("eval", settings.eval_examples, settings.seed + 1)):
        files[split] = folder / f"{split}.jsonl"
        write_jsonl(generate_bios(count, seed=seed, min_facts=settings.min_facts, max_facts=settings.max_facts),
                    str(files[split]))
    return files


def bio_texts(train_file: Path) -> List[str]:
    with open(train_file, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    return [r["text"] for r in rows] + [r["summary"] for r in rows]


def llama_bio_texts(train_file: Path) -> List[str]:
    """The bio texts and the prompt template's own text (its newline and words)."""
    return bio_texts(train_file) + [default_template(Summarization.name).replace("{source}", "")]


def qa_data(settings: QASettings, folder: Path) -> Dict[str, Path]:
    """The training and evaluation sets (different seeds, one world of names) as SQuAD json."""
    common = dict(questions_per_context=settings.questions_per_context, people=settings.people,
                  facts_per_person=settings.facts_per_person)
    files = {}
    for split, contexts, seed in (("train", settings.train_contexts, settings.seed),
                                  ("eval", settings.eval_contexts, settings.seed + 1)):
        files[split] = folder / f"{split}.json"
        write_squad(generate_squad(contexts, seed=seed, **common), str(files[split]))
    return files


def qa_texts(train_file: Path) -> List[str]:
    with open(train_file, encoding="utf-8") as handle:
        rows = flatten_squad(json.load(handle)["data"])
    return [f"question: {r['question']} context: {r['context']}" for r in rows] + [r["answers"]["text"][0] for r in rows]


DemoSettings = QASettings  # the question-answering demo's settings under their earlier name (bench/ uses it)


@dataclass
class DemoTask:
    """What differs between the demo's tasks; everything else is one code path."""

    adapter: Callable  # the task script's adapter class
    settings: type
    write_data: Callable
    tokenizer_texts: Callable
    length_args: Tuple[str, ...]  # input and output lengths, as the task script names them
    columns: Tuple[Tuple[str, str, str], ...]  # quality columns: (title, eval key, format)
    data_suffix: str  # of the data files the task writes, data/{train,eval}<suffix>
    cache_name: str  # the cached model's folder under cache/
    output_name: str  # the results' folder under outputs/
    run_suffix: str = ""  # keeps each task's plots/<run name>/ apart
    decoder_only: bool = False  # a Llama-style model: the source goes into the task's default prompt
    lossless_min: Optional[float] = None  # self-speculation's speed-up target (None: faster at all)

    def length(self, arg: str) -> int:
        """The value of length argument `arg` (named without its dashes), in tokens."""
        return int(self.length_args[self.length_args.index("--" + arg) + 1])


TASKS = {
    "bio": DemoTask(Summarization, BioSettings, bio_data, bio_texts,
                    ("--max_source_length", "64", "--max_target_length", "64", "--val_max_target_length", "64"),
                    (("ROUGE-L", "eval_rougeL", "{:.1f}"), ("ROUGE-2", "eval_rouge2", "{:.1f}")),
                    ".jsonl", "demo_bio", "demo"),
    "qa": DemoTask(QuestionAnswering, QASettings, qa_data, qa_texts,
                   ("--max_seq_length", "128", "--max_answer_length", "16"),
                   (("F1", "eval_f1", "{:.1f}"), ("EM", "eval_exact_match", "{:.1f}")),
                   ".json", "demo_model", "demo_qa", run_suffix="_qa"),  # the cache bench/ and the sweep read
}
# --arch llama: the data-to-text task with a decoder-only model (its prompt: 64 source tokens and the template)
LLAMA_TASKS = {
    "bio": DemoTask(Summarization, LlamaBioSettings, bio_data, llama_bio_texts,
                    ("--max_source_length", "72", "--max_target_length", "64", "--val_max_target_length", "64"),
                    TASKS["bio"].columns, ".jsonl", "demo_bio_llama", "demo_llama", run_suffix="_llama",
                    decoder_only=True, lossless_min=1.1),
}
ARCHS = {"t5": TASKS, "llama": LLAMA_TASKS}
COST_COLUMNS = (("block_avg", "eval_block_avg", "{:.2f}"),
                ("block_avg (FREE's count)", "eval_block_avg_free", "{:.2f}"),
                ("conf. MFLOPs/sample", "eval_flops_confidence_per_sample", "{:.2f}"),
                ("tokens/s", "tokens_per_second", "{:.0f}"),
                ("speed-up", "speedup", "{:.2f}x"))


def method_rows(num_layers: int) -> List[Tuple[str, Dict]]:
    """(row name, flags) of every row: DEMO_ROWS with a static exit at each layer below the last."""
    rows = [(row, {**method_flags(name, **parameters), **extra}) for row, name, parameters, extra in DEMO_ROWS]
    static = [(f"static exit, layer {layer}", method_flags("static", static_layer=layer))
              for layer in range(1, num_layers)]
    return rows[:1] + static + rows[1:]


# ----- training ---------------------------------------------------------------------------------
def train_model(task: DemoTask, settings, model_dir: Path, files: Dict[str, Path]) -> float:
    """Tokenizer, random T5 (or Llama), then weighted_ce (or the recipe's) training via the task
    script; returns minutes."""
    began = time.perf_counter()
    init_dir = model_dir.parent / (model_dir.name + "_init")
    tokenizer = train_toy_tokenizer(task.tokenizer_texts(files["train"]), vocab_size=settings.vocab_size)
    if task.decoder_only:
        model = build_toy_llama(tokenizer, hidden_size=settings.hidden_size, num_layers=settings.decoder_layers,
                                num_heads=settings.num_heads, num_kv_heads=settings.num_kv_heads,
                                intermediate_size=settings.intermediate_size, max_positions=settings.max_positions,
                                seed=settings.seed, save_dir=str(init_dir))
        recipe = RECIPES[settings.recipe]
        print(f"Llama: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, vocabulary "
              f"{len(tokenizer)}, {settings.decoder_layers} blocks, recipe {settings.recipe}")
    else:
        model = build_toy_t5(tokenizer, d_model=settings.d_model, num_layers=settings.encoder_layers,
                             num_decoder_layers=settings.decoder_layers, num_heads=settings.num_heads,
                             d_kv=settings.d_kv, d_ff=settings.d_ff, seed=settings.seed, save_dir=str(init_dir))
        recipe = RECIPES["weighted_ce"]
        print(f"T5: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, vocabulary {len(tokenizer)}, "
              f"{settings.encoder_layers} encoder and {settings.decoder_layers} decoder blocks")
    runner.run(task.adapter(), [
        "--model_name_or_path", str(init_dir), "--train_file", str(files["train"]), "--do_train",
        "--output_dir", str(model_dir), "--overwrite_output_dir", "True",
        "--output_hidden_states_decoder", "True", *recipe,
        *task.length_args,
        "--per_device_train_batch_size", str(settings.batch_size), "--max_steps", str(settings.train_steps),
        "--learning_rate", str(settings.learning_rate), "--warmup_steps", str(settings.warmup_steps),
        "--weight_decay", "0.01", "--seed", str(settings.seed),
        "--save_strategy", "no", "--logging_steps", "50", "--report_to", "none", "--disable_tqdm", "True",
    ])
    shutil.rmtree(init_dir, ignore_errors=True)
    return (time.perf_counter() - began) / 60


def cached_model(settings, cache_dir: Path, retrain: bool) -> Dict:
    """The trained model's folder and data files, training only when the cache does not match
    (the task is the one whose settings these are)."""
    task = next(t for tasks in ARCHS.values() for t in tasks.values() if isinstance(settings, t.settings))
    model_dir, data_dir = cache_dir / "model", cache_dir / "data"
    stamp = cache_dir / "demo_settings.json"
    files = {split: data_dir / f"{split}{task.data_suffix}" for split in ("train", "eval")}
    wanted = asdict(settings)
    info = json.loads(stamp.read_text()) if stamp.is_file() else {}
    if not retrain and info.get("settings") == wanted \
            and (model_dir / "model.safetensors").is_file() and all(f.is_file() for f in files.values()):
        print(f"Reusing the cached model in {model_dir} (trained in {info['train_minutes']:.1f} min; --retrain to redo).")
        return {"model_dir": model_dir, "files": files, "train_minutes": info["train_minutes"], "cached": True}
    shutil.rmtree(cache_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    files = task.write_data(settings, data_dir)
    print(f"Training the demo model for {settings.train_steps} steps (a few minutes on 2 cores) ...")
    minutes = train_model(task, settings, model_dir, files)
    stamp.write_text(json.dumps({"settings": wanted, "train_minutes": minutes}, indent=2))
    print(f"Trained in {minutes:.1f} min; cached in {model_dir}.")
    return {"model_dir": model_dir, "files": files, "train_minutes": minutes, "cached": False}


# ----- quality: the task script, batched -----------------------------------------------------------
def flags_to_argv(flags: Dict) -> List[str]:
    return [item for name, value in flags.items() for item in (f"--{name}", str(value))]


def evaluate(task: DemoTask, flags: Dict, model_dir: Path, eval_file: Path, out_dir: Path,
             max_samples: Optional[int], batch_size: int) -> Dict:
    """One method through the task script's pipeline in deploy mode: its eval_* results."""
    argv = ["--model_name_or_path", str(model_dir), "--validation_file", str(eval_file), "--do_eval",
            "--output_dir", str(out_dir), "--overwrite_output_dir", "True", "--deploy_scenario", "True",
            *task.length_args, "--per_device_eval_batch_size", str(batch_size), "--disable_tqdm", "True"]
    if max_samples is not None:
        argv += ["--max_eval_samples", str(max_samples)]
    return runner.run(task.adapter(), argv + flags_to_argv({**flags, "count_flops": True}))


# ----- speed: batch 1, interleaved rounds -----------------------------------------------------------
def eval_sources(task: DemoTask, eval_file: Path, count: int) -> List[str]:
    """The first `count` model inputs of the evaluation file, as the task script builds them."""
    adapter = task.adapter()
    data_args = argparse.Namespace(source_prefix=None, dataset_name=None, **{a: None for a in adapter.own_arguments})
    for arg, value in adapter.defaults.items():
        setattr(data_args, arg, value)
    if task.decoder_only:
        data_args.source_prefix = ""  # the prompt template carries the instruction
    if task.adapter is QuestionAnswering:
        with open(eval_file, encoding="utf-8") as handle:
            rows = flatten_squad(json.load(handle)["data"])
    else:
        with open(eval_file, encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle]
    return [adapter.source_text(row, data_args) for row in rows[:count]]


def time_rows(rows: List[Tuple[str, Dict]], model_dir: Path, sources: List[str], source_length: int,
              max_new_tokens: int, rounds: int) -> Dict[str, Dict]:
    """Tokens/s of each row decoding `sources` one at a time; the rows take turns within each
    round (so a slow spell of the machine hits them all) and the median round is kept. Also
    returns each row's first-round tokens and exit layers per source."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    deploy_class = runner.model_class(training=False, deploy=True, model_type=config.model_type)
    model = deploy_class.from_pretrained(model_dir, config=config).eval()
    if config.is_encoder_decoder:
        inputs = [tokenizer(s, max_length=source_length, truncation=True, return_tensors="pt") for s in sources]  # as the task script
    else:  # the task script's prompt, as it builds it for the generated length
        template = default_template(Summarization.name)
        budget = min(source_length, config.max_position_embeddings - max_new_tokens)
        prompts = prompt_format(tokenizer, template, budget, "the demo's lengths").encode(tokenizer, sources)[0]
        inputs = [tokenizer.pad({"input_ids": [ids]}, return_tensors="pt") for ids in prompts]
    args = {name: AdditionalArguments(deploy_scenario=True, **flags) for name, flags in rows}
    speeds = {name: [] for name, _ in rows}
    decoded = {}
    for round_ in range(rounds):
        for name, _ in rows:
            tokens, seconds, outputs = 0, 0.0, []
            for batch in inputs:
                began = time.perf_counter()
                ids = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                     max_new_tokens=max_new_tokens, exit_args=args[name])
                seconds += time.perf_counter() - began
                stats = model.exit_stats()
                tokens += stats["tokens"]
                start = 1 if config.is_encoder_decoder else batch.input_ids.shape[1]  # after the start token / prompt
                outputs.append((ids[0, start:].tolist(), stats["exit_layers"][0]))
            speeds[name].append(tokens / seconds)
            decoded.setdefault(name, outputs)
        print(f"  timing round {round_ + 1}/{rounds} done")
    return {name: {"tokens_per_second": statistics.median(speeds[name]), "rounds": speeds[name],
                   "outputs": decoded[name], "tokenizer": tokenizer} for name, _ in rows}


# ----- the per-token view of exit layers --------------------------------------------------------------
# 256-colour ANSI codes and HTML colours from early (green) to late (red) layers
ANSI_SCALE = (46, 82, 118, 154, 190, 226, 220, 214, 208, 202, 196)
HTML_SCALE = ("#1a9850", "#66bd63", "#a6d96a", "#d9ef8b", "#fee08b", "#fdae61", "#f46d43", "#d73027")


def _shade(layer: int, num_layers: int, scale: Sequence) -> object:
    """The colour of `layer` (1..num_layers) on `scale`, first colour for layer 1, last for L."""
    position = (layer - 1) / (num_layers - 1) if num_layers > 1 else 1.0
    return scale[round(position * (len(scale) - 1))]


def piece_text(piece: str) -> str:
    """A word piece for display: a word's first piece as the word, a continuation marked ##."""
    if piece in SPECIAL_TOKENS:
        return piece
    return piece[1:] if piece.startswith("▁") else "##" + piece


def exit_view_text(pieces: Sequence[str], layers: Sequence[int], num_layers: int, colour: bool,
                   width: int = 100) -> str:
    """Pieces with their exit layer printed beneath each (coloured by layer with `colour`),
    wrapped at `width` characters."""
    if len(pieces) != len(layers):
        raise ValueError(f"{len(pieces)} tokens but {len(layers)} exit layers.")
    lines, top, bottom, used = [], [], [], 0
    for piece, layer in zip(pieces, layers):
        text = piece_text(piece)
        cell = max(len(text), len(str(layer)))
        if used and used + cell + 1 > width:
            lines += [" ".join(top), " ".join(bottom), ""]
            top, bottom, used = [], [], 0
        shown = text.ljust(cell)
        if colour:
            shown = f"\x1b[38;5;{_shade(layer, num_layers, ANSI_SCALE)}m{shown}\x1b[0m"
        top.append(shown)
        bottom.append(str(layer).ljust(cell))
        used += cell + 1
    lines += [" ".join(top), " ".join(bottom)]
    return "\n".join(line.rstrip() for line in lines)


def exit_view_html(examples: Sequence[Dict], num_layers: int, title: str) -> str:
    """An HTML page: each example's tokens coloured by exit layer, the layer beneath each."""
    legend = "".join(f'<span class="t" style="background:{_shade(l, num_layers, HTML_SCALE)}">layer<sub>{l}</sub></span>'
                     for l in range(1, num_layers + 1))
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:sans-serif;max-width:60em;margin:2em auto}"
             ".t{display:inline-block;text-align:center;margin:2px 1px;padding:1px 3px;border-radius:3px}"
             ".t sub{display:block;font-size:70%;color:#333}.w{margin-left:.6em}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><p>Each token is coloured by the decoder layer it left at "
             f"(1 = first of {num_layers}); the number beneath is that layer.</p><p>{legend}</p>"]
    for example in examples:
        spans = []  # joined without whitespace: only a word's first piece is set apart (class w)
        for piece, layer in zip(example["pieces"], example["exit_layers"]):
            gap = " w" if piece.startswith("▁") or piece in SPECIAL_TOKENS else ""
            text = html.escape(piece[1:] if piece.startswith("▁") else piece)
            spans.append(f'<span class="t{gap}" style="background:{_shade(layer, num_layers, HTML_SCALE)}" '
                         f'title="layer {layer}">{text}<sub>{layer}</sub></span>')
        parts.append(f"<h3>{html.escape(example['source'])}</h3><p>{''.join(spans)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def view_examples(timed: Dict, sources: List[str], count: int) -> List[Dict]:
    """The first `count` examples of the target row: source, word pieces and exit layers (eos kept)."""
    row = timed[TARGET_ROW]
    examples = []
    for source, (ids, layers) in zip(sources[:count], row["outputs"][:count]):
        ids = ids[: len(layers)]  # a finished row is padded after its eos
        examples.append({"source": source, "pieces": row["tokenizer"].convert_ids_to_tokens(ids),
                         "exit_layers": list(layers)})
    return examples


# ----- the report ----------------------------------------------------------------------------------------
def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def table_markdown(results: Dict[str, Dict], columns) -> str:
    header = "| method | " + " | ".join(title for title, _, _ in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for name, row in results.items():
        cells = [fmt.format(row[key]) if row.get(key) is not None else "n/a" for _, key, fmt in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_flop_units(results: Dict[str, Dict]) -> None:
    """Confidence FLOPs per sample in millions, for the table."""
    for row in results.values():
        if "eval_flops_confidence_per_sample" in row:
            row["eval_flops_confidence_per_sample"] = row["eval_flops_confidence_per_sample"] / 1e6


def static_metric(results: Dict[str, Dict], key: str, num_layers: int) -> Dict[int, float]:
    """The main metric of a static exit at every layer (the last is the full model)."""
    static = {layer: results[f"static exit, layer {layer}"][key] for layer in range(1, num_layers)
              if f"static exit, layer {layer}" in results}
    static[num_layers] = results["full model"][key]
    return static


def check_targets(results: Dict[str, Dict], key: str, num_layers: int, timed: Optional[Dict] = None,
                  lossless_min: Optional[float] = None) -> Dict:
    """The demo's targets: full model >= 85; the target row saves >= 40% of the decoder blocks
    within 1 point of the full model, at >= 1.4x its tokens/s; the lossless row decodes exactly the
    full model's tokens (timed samples and evaluation metric alike), faster (at >= lossless_min
    times the full model's tokens/s when given)."""
    full, early = results["full model"], results.get(TARGET_ROW)
    targets = {"full_model_quality": {"value": full[key], "target": ">= 85", "met": full[key] >= 85}}
    if early is not None:
        saved = 1 - early["eval_block_avg"] / num_layers
        drop = full[key] - early[key]
        targets.update({
            "blocks_saved": {"row": TARGET_ROW, "value": saved, "target": ">= 0.40", "met": saved >= 0.40},
            "quality_drop": {"row": TARGET_ROW, "value": drop, "target": "<= 1 point", "met": drop <= 1.0},
        })
        if early.get("speedup") is not None:
            targets["speedup"] = {"row": TARGET_ROW, "value": early["speedup"], "target": ">= 1.4",
                                  "met": early["speedup"] >= 1.4}
    lossless = results.get(LOSSLESS_ROW)
    if lossless is not None and timed is not None and LOSSLESS_ROW in timed:
        same = ([tokens for tokens, _ in timed[LOSSLESS_ROW]["outputs"]]
                == [tokens for tokens, _ in timed["full model"]["outputs"]]) and lossless[key] == full[key]
        targets["lossless_identical"] = {"row": LOSSLESS_ROW, "value": float(same), "target": "1 (identical)",
                                         "met": same}
        met = lossless["speedup"] > 1.0 if lossless_min is None else lossless["speedup"] >= lossless_min
        targets["lossless_speedup"] = {"row": LOSSLESS_ROW, "value": lossless["speedup"], "met": met,
                                       "target": "> 1" if lossless_min is None else f">= {lossless_min}"}
    return targets


def write_plots(results: Dict[str, Dict], static: Dict[int, float], out_dir: Path, num_layers: int,
                metric: str, title: str) -> List[Path]:
    """The main metric of a static exit per layer, and against blocks per token for every row."""
    from util.pareto import write_pareto_report
    from util.plots import save_figure, static_exit_figure

    paths = [save_figure(static_exit_figure(static, title, num_layers, "demo"), out_dir / f"static_exit_{metric}.png")]
    rows = [{"method": name, metric: row[f"eval_{metric}"], "block_avg": row["eval_block_avg"]}
            for name, row in results.items()]
    paths += write_pareto_report(rows, out_dir, metric, cost_keys=("block_avg",), label_keys=("method",), name="pareto")
    return paths


def cores_in_use(seconds: float = 0.3) -> Optional[float]:
    """How many cores other work keeps busy now: the busy share of /proc/stat's CPU time over
    `seconds`, times the cores (None where /proc/stat is not there). Not the load average, which
    over its minute still counts the demo's own previous run."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    elapsed = total1 - total0
    return (os.cpu_count() or 1) * (elapsed - (idle1 - idle0)) / elapsed if elapsed > 0 else 0.0


def default_threads() -> Tuple[int, str]:
    """(threads, why): 2 (the demo is sized for 2 cores), but 1 when other work keeps the cores
    busy now: spinning OpenMP threads that share a core with other work make each tiny operation
    many times slower."""
    cores = os.cpu_count() or 1
    if cores < 2:
        return 1, "1 core"
    used = cores_in_use()
    if used is None:
        return 2, "core use not readable here (no /proc/stat): the default"
    if cores - used < 1.5:
        return 1, f"{used:.1f} of {cores} cores busy with other work over 0.3 s"
    return 2, f"{used:.1f} of {cores} cores busy with other work over 0.3 s"


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--task", default="bio")
    first.add_argument("--arch", default="t5")
    known = first.parse_known_args(argv)[0]
    chosen, arch = known.task, known.arch
    if arch not in ARCHS:
        raise ValueError(f"--arch {arch} is not a demo model; choose one of: {', '.join(ARCHS)}.")
    if chosen not in ARCHS[arch]:
        raise ValueError(f"--task {chosen} is not a demo task of --arch {arch}; choose one of: {', '.join(ARCHS[arch])}.")
    task = ARCHS[arch][chosen]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="bio",
                        help="bio: data-to-text (summarization), the main demo; qa: question answering")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="t5",
                        help="t5: a small T5 (the main demo); llama: a small Llama-style decoder-only model (bio only)")
    for name, value in asdict(task.settings()).items():
        choices = sorted(RECIPES) if name == "recipe" else None
        parser.add_argument(f"--{name}", type=type(value), default=value, choices=choices, help=f"(default {value})")
    parser.add_argument("--cache_dir", default=str(ROOT / "cache" / task.cache_name),
                        help="where the model is cached (default cache/demo_bio, cache/demo_model for --task qa, "
                             "cache/demo_bio_llama for --arch llama)")
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / task.output_name),
                        help="where results go (default outputs/demo, outputs/demo_qa for --task qa, "
                             "outputs/demo_llama for --arch llama)")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="evaluate only the first N rows")
    parser.add_argument("--eval_batch_size", type=int, default=32, help="rows decoded at once for the quality columns")
    parser.add_argument("--timing_samples", type=int, default=24, help="rows decoded one at a time for tokens/s")
    parser.add_argument("--timing_rounds", type=int, default=3, help="interleaved timing rounds (the median is kept)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: 2, or 1 when other work keeps the cores busy now, "
                             "sampled over 0.3 s; the choice and its reason are printed)")
    parser.add_argument("--retrain", action="store_true", help="train again even if a cached model matches")
    args = parser.parse_args(argv)
    for name in ("eval_batch_size", "timing_samples", "timing_rounds", "threads", "max_eval_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name}={value} must be a positive integer.")
    return args


def main(argv=None) -> Dict:
    args = parse_args(argv)
    began = time.perf_counter()
    threads, why = (args.threads, "--threads") if args.threads else default_threads()
    torch.set_num_threads(threads)
    print(f"threads: {threads} ({why})", flush=True)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    transformers.utils.logging.disable_progress_bar()  # one line per step of the demo, not per file
    datasets.disable_progress_bars()
    task = ARCHS[args.arch][args.task]
    settings = task.settings(**{k: getattr(args, k) for k in asdict(task.settings())})
    cached = cached_model(settings, Path(args.cache_dir), args.retrain)
    adapter = task.adapter()
    metric, key = adapter.main_metric, f"eval_{adapter.main_metric}"
    num_layers = settings.decoder_layers
    source_length = task.length(task.adapter.source_length_arg)
    max_new_tokens = task.length(task.adapter.eval_length_arg)

    out_dir = Path(args.output_dir)
    rows = method_rows(num_layers)
    results = {}
    quality_began = time.perf_counter()
    for name, flags in rows:
        started = time.perf_counter()
        results[name] = evaluate(task, flags, cached["model_dir"], cached["files"]["eval"],
                                 out_dir / "runs" / (slug(name) + task.run_suffix), args.max_eval_samples,
                                 args.eval_batch_size)
        print(f"  {name}: {results[name][key]:.1f} {metric}, {time.perf_counter() - started:.0f} s")
    quality_minutes = (time.perf_counter() - quality_began) / 60

    timing_began = time.perf_counter()
    sources = eval_sources(task, cached["files"]["eval"], args.timing_samples)
    timed_rows = [(name, flags) for name, flags in rows if name not in UNTIMED_ROWS]
    timed = time_rows(timed_rows, cached["model_dir"], sources, source_length, max_new_tokens, args.timing_rounds)
    full_speed = timed["full model"]["tokens_per_second"]
    for name, row in timed.items():
        results[name]["tokens_per_second"] = row["tokens_per_second"]
        results[name]["tokens_per_second_rounds"] = row["rounds"]
        results[name]["speedup"] = row["tokens_per_second"] / full_speed
    timing_minutes = (time.perf_counter() - timing_began) / 60

    add_flop_units(results)
    static = static_metric(results, key, num_layers)
    title = task.columns[0][0]
    plots = write_plots(results, static, out_dir, num_layers, metric, title)
    columns = task.columns + COST_COLUMNS
    table = table_markdown(results, columns)
    print("\n" + table)
    targets = check_targets(results, key, num_layers, timed, lossless_min=task.lossless_min)
    print("\ntargets: " + "; ".join(f"{n} {t['value']:.2f} ({t['target']}): {'met' if t['met'] else 'NOT met'}"
                                   for n, t in targets.items()))

    examples = view_examples(timed, sources, VIEW_EXAMPLES) if TARGET_ROW in timed else []
    colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    print(f"\nExit layer of each token, {TARGET_ROW} (layer beneath each token; ## continues a word):")
    for example in examples:
        print(f"\n{example['source']}\n" + exit_view_text(example["pieces"], example["exit_layers"], num_layers, colour))
    out_dir.mkdir(parents=True, exist_ok=True)
    view_path = out_dir / "exit_view.html"
    view_path.write_text(exit_view_html(examples, num_layers, f"Exit layer of each token: {TARGET_ROW}"),
                         encoding="utf-8")

    summary = {"task": args.task, "arch": args.arch, "main_metric": metric, "settings": asdict(settings),
               "train_minutes": cached["train_minutes"], "model_cached": cached["cached"],
               "quality_minutes": quality_minutes, "timing_minutes": timing_minutes,
               "total_minutes": (time.perf_counter() - began) / 60, "threads": torch.get_num_threads(),
               "threads_reason": why,
               "timing": {"method": "batch 1, rows interleaved within each round, median round",
                          "samples": len(sources), "rounds": args.timing_rounds},
               "quality_batch_size": args.eval_batch_size, "targets": targets, "results": results,
               f"static_exit_{metric}": static, "exit_view": examples, "plots": [str(p) for p in plots] + [str(view_path)]}
    (out_dir / "demo_results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "demo_results.md").write_text(table + "\n")
    print(f"\nsaved {out_dir / 'demo_results.json'}, {out_dir / 'demo_results.md'} and {view_path} "
          f"({summary['total_minutes']:.1f} min in all)")
    return summary


if __name__ == "__main__":
    run_entry_point(main)
