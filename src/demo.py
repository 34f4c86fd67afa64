"""Offline demo of early-exit decoding, end to end, on 2 CPU cores.

    make demo          (or: .venv/bin/python src/demo.py)

1. Generates, from a fixed seed, a question-answering set in SQuAD's format (util/demo_data.py).
2. Trains a BPE tokenizer and a small T5 (6 decoder blocks) with `weighted_ce` on every decoder
   layer, through the task script's own training (`run_question_answering.py --do_train`), and
   caches it in cache/demo_model/ (a later run with the same settings reuses it).
3. Evaluates it with `run_question_answering.py --deploy_scenario True` under each row of
   DEMO_ROWS (methods of the table in util/methods.py), with FLOPs counted.
4. Prints one comparison table and saves it as JSON and Markdown under outputs/demo/.
"""

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import datasets
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tasks import runner  # noqa: E402
from tasks.adapters import QuestionAnswering  # noqa: E402
from tasks.data import flatten_squad  # noqa: E402
from util.demo_data import generate_squad, write_squad  # noqa: E402
from util.methods import method_flags  # noqa: E402
from util.toy_models import build_toy_t5, train_toy_tokenizer  # noqa: E402
from util.cli import run_entry_point  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# (row, METHOD of the table in util/methods.py, its parameters, extra flags): one row of the
# table each. Add a row to compare another method.
DEMO_ROWS = [
    ("full model", "full", {}, {}),
    ("static exit, layer 3", "static", {"static_layer": 3}, {}),
    ("early exit, softmax 0.9", "softmax", {}, {}),
    ("early exit, softmax 0.8", "softmax", {"threshold": 0.8}, {}),
    ("early exit, state 0.99", "state", {"threshold": 0.99}, {}),
    ("softmax 0.9, fixed vocabulary", "vocab_fixed", {}, {}),
    ("softmax 0.9, decaying vocabulary", "vocab_decaying", {}, {}),
    ("softmax 0.9, adaptive vocabulary", "vocab_adaptive", {}, {}),
    ("contrastive decoding 0.9", "contrastive", {"min_layer": 2}, {}),
    ("reweighted contrastive 0.9", "reweight", {"min_layer": 2}, {}),
    ("JSD contrastive 0.9", "jsd", {"min_layer": 3}, {}),
    ("softmax 0.9, decaying + re-ranking", "vocab_decaying_rerank", {}, {}),
    ("FREE shallow-deep, layer 2, softmax 0.9", "shallow_deep", {"shallow_layer": 2}, {}),
    ("self-speculation, layer 2, softmax 0.9", "self_speculation", {"shallow_layer": 2}, {}),
    # traces every layer (outputs are the full model's) and draws the plots under plots/diagnostics/
    ("diagnostics", "jsd", {"min_layer": 3}, {"plotting_logits": True, "render_jsds": True}),
]
METHODS = [(row, {**method_flags(name, **parameters), **extra}) for row, name, parameters, extra in DEMO_ROWS]
EARLY = method_flags("softmax")  # early exit, softmax 0.9 from layer 1
TABLE_COLUMNS = (("F1", "eval_f1", "{:.1f}"), ("EM", "eval_exact_match", "{:.1f}"),
                 ("block_avg", "eval_block_avg", "{:.2f}"),
                 ("conf. MFLOPs/sample", "eval_flops_confidence_per_sample", "{:.2f}"),
                 ("tokens/s", "eval_tokens_per_second", "{:.0f}"))


@dataclass
class DemoSettings:
    """Everything the cached model depends on: a change retrains it."""

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


# ----- data ------------------------------------------------------------------------------------
def write_data(settings: DemoSettings, folder: Path) -> Dict[str, Path]:
    """The training and evaluation sets (different seeds, one world of names) as SQuAD json."""
    folder.mkdir(parents=True, exist_ok=True)
    common = dict(questions_per_context=settings.questions_per_context, people=settings.people,
                  facts_per_person=settings.facts_per_person)
    files = {}
    for split, contexts, seed in (("train", settings.train_contexts, settings.seed),
                                  ("eval", settings.eval_contexts, settings.seed + 1)):
        files[split] = folder / f"{split}.json"
        write_squad(generate_squad(contexts, seed=seed, **common), str(files[split]))
    return files


def tokenizer_texts(train_file: Path) -> List[str]:
    with open(train_file, encoding="utf-8") as handle:
        rows = flatten_squad(json.load(handle)["data"])
    return [f"question: {r['question']} context: {r['context']}" for r in rows] + [r["answers"]["text"][0] for r in rows]


# ----- training ---------------------------------------------------------------------------------
def train_model(settings: DemoSettings, model_dir: Path, files: Dict[str, Path]) -> float:
    """Tokenizer, random T5, then weighted_ce training via the task script; returns minutes."""
    began = time.perf_counter()
    init_dir = model_dir.parent / (model_dir.name + "_init")
    tokenizer = train_toy_tokenizer(tokenizer_texts(files["train"]), vocab_size=settings.vocab_size)
    model = build_toy_t5(tokenizer, d_model=settings.d_model, num_layers=settings.encoder_layers,
                         num_decoder_layers=settings.decoder_layers, num_heads=settings.num_heads,
                         d_kv=settings.d_kv, d_ff=settings.d_ff, seed=settings.seed, save_dir=str(init_dir))
    print(f"T5: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, vocabulary {len(tokenizer)}, "
          f"{settings.encoder_layers} encoder and {settings.decoder_layers} decoder blocks")
    runner.run(QuestionAnswering(), [
        "--model_name_or_path", str(init_dir), "--train_file", str(files["train"]), "--do_train",
        "--output_dir", str(model_dir), "--overwrite_output_dir", "True",
        "--output_hidden_states_decoder", "True", "--intermediate_loss_fn", "weighted_ce",
        "--max_seq_length", "128", "--max_answer_length", "16",
        "--per_device_train_batch_size", str(settings.batch_size), "--max_steps", str(settings.train_steps),
        "--learning_rate", str(settings.learning_rate), "--warmup_steps", str(settings.warmup_steps),
        "--weight_decay", "0.01", "--seed", str(settings.seed),
        "--save_strategy", "no", "--logging_steps", "50", "--report_to", "none", "--disable_tqdm", "True",
    ])
    shutil.rmtree(init_dir, ignore_errors=True)
    return (time.perf_counter() - began) / 60


def cached_model(settings: DemoSettings, cache_dir: Path, retrain: bool) -> Dict:
    """The trained model's folder and data files, training only when the cache does not match."""
    model_dir, data_dir = cache_dir / "model", cache_dir / "data"
    stamp = cache_dir / "demo_settings.json"
    files = {"train": data_dir / "train.json", "eval": data_dir / "eval.json"}
    wanted = asdict(settings)
    info = json.loads(stamp.read_text()) if stamp.is_file() else {}
    if not retrain and info.get("settings") == wanted \
            and (model_dir / "model.safetensors").is_file() and all(f.is_file() for f in files.values()):
        print(f"Reusing the cached model in {model_dir} (trained in {info['train_minutes']:.1f} min; --retrain to redo).")
        return {"model_dir": model_dir, "files": files, "train_minutes": info["train_minutes"], "cached": True}
    shutil.rmtree(cache_dir, ignore_errors=True)
    files = write_data(settings, data_dir)
    print(f"Training the demo model for {settings.train_steps} steps (a few minutes on 2 cores) ...")
    minutes = train_model(settings, model_dir, files)
    stamp.write_text(json.dumps({"settings": wanted, "train_minutes": minutes}, indent=2))
    print(f"Trained in {minutes:.1f} min; cached in {model_dir}.")
    return {"model_dir": model_dir, "files": files, "train_minutes": minutes, "cached": False}


# ----- evaluation --------------------------------------------------------------------------------
def flags_to_argv(flags: Dict) -> List[str]:
    return [item for name, value in flags.items() for item in (f"--{name}", str(value))]


def evaluate(flags: Dict, model_dir: Path, eval_file: Path, out_dir: Path, max_samples: Optional[int]) -> Dict:
    """One method through run_question_answering's pipeline in deploy mode: its eval_* results."""
    argv = ["--model_name_or_path", str(model_dir), "--validation_file", str(eval_file), "--do_eval",
            "--output_dir", str(out_dir), "--overwrite_output_dir", "True", "--deploy_scenario", "True",
            "--max_seq_length", "128", "--max_answer_length", "16", "--disable_tqdm", "True"]
    if max_samples is not None:
        argv += ["--max_eval_samples", str(max_samples)]
    return runner.run(QuestionAnswering(), argv + flags_to_argv({**flags, "count_flops": True}))


def static_sweep(results: Dict[str, Dict], cached: Dict, out_dir: Path, num_layers: int,
                 max_samples: Optional[int]) -> Dict[int, float]:
    """F1 of a static exit at every layer: measured by a `plotting_logits` row of the table when it
    has one (eval_static_exit_f1), else from the table's rows and an evaluation per missing layer."""
    measured = [row["eval_static_exit_f1"] for row in results.values() if "eval_static_exit_f1" in row]
    if measured:
        f1 = dict(enumerate(measured[0], start=1))
    else:
        known = {flags.get("static_exit_layer", num_layers): name for name, flags in METHODS
                 if set(flags) <= {"static_exit_layer"}}
        f1 = {}
        for layer in range(1, num_layers + 1):
            row = results.get(known.get(layer))
            if row is None:
                row = evaluate({"static_exit_layer": layer}, cached["model_dir"], cached["files"]["eval"],
                               out_dir / "runs" / f"static_exit_{layer}", max_samples)
            f1[layer] = row["eval_f1"]
    print("  static exit F1 per layer: " + ", ".join(f"{layer}: {v:.1f}" for layer, v in f1.items()))
    return f1


def write_plots(results: Dict[str, Dict], static: Dict[int, float], out_dir: Path, num_layers: int) -> List[Path]:
    """F1 of a static exit per layer, and F1 against blocks per token for every method."""
    from util.pareto import write_pareto_report
    from util.plots import save_figure, static_exit_figure

    paths = [save_figure(static_exit_figure(static, "F1", num_layers, "demo"), out_dir / "static_exit_f1.png")]
    rows = [{"method": name, "f1": row["eval_f1"], "block_avg": row["eval_block_avg"]}
            for name, row in results.items()]
    rows += [{"method": f"static exit, layer {layer}", "f1": v, "block_avg": float(layer)} for layer, v in static.items()]
    paths += write_pareto_report(rows, out_dir, "f1", cost_keys=("block_avg",), label_keys=("method",), name="pareto")
    return paths


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def table_markdown(results: Dict[str, Dict]) -> str:
    header = "| method | " + " | ".join(title for title, _, _ in TABLE_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(TABLE_COLUMNS) + 1)]
    for name, row in results.items():
        cells = [fmt.format(row[key]) if key in row else "n/a" for _, key, fmt in TABLE_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_flop_units(results: Dict[str, Dict]) -> None:
    """Confidence FLOPs per sample in millions, for the table."""
    for row in results.values():
        if "eval_flops_confidence_per_sample" in row:
            row["eval_flops_confidence_per_sample"] = row["eval_flops_confidence_per_sample"] / 1e6


def default_threads() -> int:
    """2 threads (the demo is sized for 2 cores), but 1 when the cores are already busy: spinning
    OpenMP threads that share a core with other work make each tiny operation many times slower."""
    cores = os.cpu_count() or 1
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return 1 if cores < 2 or busy >= cores - 0.5 else 2


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = DemoSettings()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name}", type=type(value), default=value, help=f"(default {value})")
    parser.add_argument("--cache_dir", default=str(ROOT / "cache" / "demo_model"), help="where the model is cached")
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "demo"), help="where results go")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="evaluate only the first N questions")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: 2, or 1 when other work already keeps the cores busy)")
    parser.add_argument("--retrain", action="store_true", help="train again even if a cached model matches")
    return parser.parse_args(argv)


def main(argv=None) -> Dict:
    args = parse_args(argv)
    began = time.perf_counter()
    torch.set_num_threads(args.threads or default_threads())
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    transformers.utils.logging.disable_progress_bar()  # one line per step of the demo, not per file
    datasets.disable_progress_bars()
    settings = DemoSettings(**{k: getattr(args, k) for k in asdict(DemoSettings())})
    cached = cached_model(settings, Path(args.cache_dir), args.retrain)

    out_dir = Path(args.output_dir)
    results = {}
    for name, flags in METHODS:
        started = time.perf_counter()
        results[name] = evaluate(flags, cached["model_dir"], cached["files"]["eval"], out_dir / "runs" / slug(name),
                                 args.max_eval_samples)
        print(f"  {name}: {time.perf_counter() - started:.0f} s")
    static = static_sweep(results, cached, out_dir, settings.decoder_layers, args.max_eval_samples)
    add_flop_units(results)
    plots = write_plots(results, static, out_dir, settings.decoder_layers)

    table = table_markdown(results)
    print("\n" + table)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"settings": asdict(settings), "train_minutes": cached["train_minutes"], "model_cached": cached["cached"],
               "total_minutes": (time.perf_counter() - began) / 60, "results": results,
               "static_exit_f1": static, "plots": [str(p) for p in plots]}
    (out_dir / "demo_results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "demo_results.md").write_text(table + "\n")
    print(f"\nsaved {out_dir / 'demo_results.json'} and {out_dir / 'demo_results.md'} "
          f"({summary['total_minutes']:.1f} min in all)")
    return summary


if __name__ == "__main__":
    run_entry_point(main)
