"""A real pretrained LLM, offline: Gemma 3 270M (GGUF from PyPI), the fork's questions asked of it.

    pip install -r requirements-gemma.txt
    python src/real_llm.py                              # every part, from the cached model
    python src/real_llm.py --parts diagnostics --squad_texts 8 --wmt_texts 8

Parts (PARTS, run in that order; each adds its entry to outputs/gemma3/results.json):
  diagnostics  plain HF forwards over real text (SQuAD dev contexts, WMT22 German sources), every
               token teacher-forced, every layer read out as z_l = lm_head(norm(h_l)) with the
               model's own final norm and head: rank of the final prediction per layer,
               confidence (softmax top-2 gap) against agreement with the final layer (ECE),
               next-token accuracy of each layer against the text (a static exit's quality under
               teacher forcing), the discounted JSD of each earlier layer against the final one,
               and what a confidence check costs per layer (full head, fixed / decaying / adaptive
               reduction; time and FLOPs as a fraction of one layer).
  early_exit   few-shot SQuAD QA (util/real_llm_qa.py) through the early-exit loop, the model as it
               is: F1, agreement with the full model's tokens, mean blocks, acceptance rate and
               tokens/s against the full model (and HF generate), every setting interleaved.
  adapted      a short LoRA fine-tune with LayerSkip's early-exit loss on held-apart SQuAD articles
               (cached under cache/adapted/), then the same table on the adapted model.
The model is converted from its GGUF file once and cached (models/gguf_cache.py).
"""

import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models.confidence import discounted_jsd, plausibility_head, restricted_jsd, softmax_confidence  # noqa: E402
from models.flops import Shape, head_flops  # noqa: E402
from models.gguf_cache import load_gguf_model  # noqa: E402
from models.vocab_reduction import adaptive_size, schedule  # noqa: E402
from util.cli import run_entry_point  # noqa: E402
from util.diagnostics import JsdStep, JsdTrace, LayerTrace, layer_summary, overall_ece  # noqa: E402
from util.plots import (calibration_figure, jsd_heatmap_figure, new_figure, rank_figure, save_figure,  # noqa: E402
                        static_exit_figure)

ROOT = Path(__file__).resolve().parent.parent
SQUAD_ZIP = "squad_v1.1/dev-v1.1.json.zip"
WMT_FILE = "wmt22/test.de-en.jsonl"
CORPORA = ("squad", "wmt22")
REDUCTIONS = ("full", "fixed", "decaying", "adaptive")


def _arg(default, help_text):
    return field(default=default, metadata={"help": help_text})


@dataclass
class RealLLMArguments:
    parts: str = _arg("diagnostics,early_exit,adapted", "Comma-separated parts to run, of: "
                      "diagnostics, early_exit, adapted")
    gguf_file: Optional[str] = _arg(None, "A GGUF file (default: the packaged Gemma 3 270M, requirements-gemma.txt).")
    data_dir: str = _arg("../shared/data", "Folder of squad_v1.1/dev-v1.1.json.zip and wmt22/test.de-en.jsonl "
                                           "(relative to the repository root).")
    squad_texts: int = _arg(16, "SQuAD dev contexts read (one per article, in file order).")
    wmt_texts: int = _arg(16, "WMT22 German passages read (consecutive de2en sources joined).")
    text_tokens: int = _arg(40, "Tokens per text (the first ones, the <bos> token included).")
    cd_alpha: float = _arg(0.1, "Plausibility alpha of the JSD's head V_head, in (0, 1].")
    vocab_k_max: int = _arg(35000, "k_max of the vocabulary-size schedule.")
    vocab_k_min: int = _arg(250, "k_min of the vocabulary-size schedule.")
    vocab_adaptive_scale: float = _arg(0.9, "beta of adaptive reduction, in (0, 1].")
    exit_min_layer: int = _arg(1, "First layer checked (the start layer of vocabulary reduction).")
    timing_rounds: int = _arg(15, "Rounds of the cost timing (variants interleaved; the median kept).")
    threads: int = _arg(2, "torch threads (the machine this was written for has 2 cores).")
    qa_questions: int = _arg(8, "Evaluation questions of the QA tables (articles of the first half of SQuAD dev).")
    qa_shots: int = _arg(1, "Few-shot examples in each prompt (from the held-apart articles).")
    qa_new_tokens: int = _arg(10, "Most new tokens per answer (decoding also ends at a newline).")
    qa_static_layers: str = _arg("12,15,17", "Static exit layers of the QA tables.")
    qa_shallow_layers: str = _arg("6,12,15", "Shallow layers of self-speculation in the QA tables.")
    qa_draft_vocab: int = _arg(4096, "Self-speculation rows with a draft vocabulary of this many head rows beside "
                                     "the full-head drafts (0: none).")
    qa_min_layer: int = _arg(12, "First checked layer of the thresholded rows (and FREE's shallow layer).")
    qa_threshold: float = _arg(0.9, "Softmax / contrastive / shallow-deep threshold of the QA tables.")
    adapt_steps: int = _arg(30, "Optimizer steps of the adaptation (one example each).")
    adapt_lr: float = _arg(5e-4, "AdamW learning rate of the adaptation.")
    adapt_lora_rank: int = _arg(8, "LoRA rank of the adaptation (every attention and MLP projection).")
    adapt_rotation: int = _arg(6, "LayerSkip's rotational curriculum: every R-th layer's loss (and the last) per step.")
    adapt_examples: int = _arg(200, "Training examples (held-apart articles), cycled.")
    adapt_dir: str = _arg("cache/adapted", "Where adapted models are cached (keyed by their settings).")
    output_dir: str = _arg("outputs/gemma3", "Where results.json and the markdown tables go.")
    plots_dir: str = _arg("plots/gemma3", "Where the figures go.")


def check_arguments(args: RealLLMArguments) -> Dict[str, Path]:
    """Every flag and data file checked before the model loads; returns the data files."""
    unknown = [p for p in args.parts.split(",") if p not in PARTS]
    if unknown or not args.parts:
        raise ValueError(f"--parts {args.parts}: unknown part(s) {', '.join(unknown)}; known: {', '.join(PARTS)}.")
    for name in ("squad_texts", "wmt_texts", "timing_rounds", "threads", "vocab_k_min", "vocab_k_max",
                 "qa_questions", "qa_shots", "qa_new_tokens", "adapt_steps", "adapt_lora_rank", "adapt_rotation",
                 "adapt_examples"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.qa_draft_vocab == 1 or args.qa_draft_vocab < 0:
        raise ValueError(f"--qa_draft_vocab must be 0 (none) or at least 2, got {args.qa_draft_vocab}.")
    if args.text_tokens < 4:
        raise ValueError(f"--text_tokens must be at least 4, got {args.text_tokens}.")
    if not 0 < args.cd_alpha <= 1 or not 0 < args.vocab_adaptive_scale <= 1:
        raise ValueError("--cd_alpha and --vocab_adaptive_scale must lie in (0, 1].")
    if args.vocab_k_min > args.vocab_k_max:
        raise ValueError(f"--vocab_k_min={args.vocab_k_min} must not exceed --vocab_k_max={args.vocab_k_max}.")
    for name in ("qa_static_layers", "qa_shallow_layers"):
        try:
            layers = [int(x) for x in getattr(args, name).split(",")]
        except ValueError:
            raise ValueError(f"--{name} {getattr(args, name)}: expected comma-separated layer numbers.") from None
        if not layers or not all(1 <= x <= 17 for x in layers):
            raise ValueError(f"--{name} {getattr(args, name)}: layers must lie in 1..17 (the model has 18).")
    if not 1 <= args.qa_min_layer <= 17:
        raise ValueError(f"--qa_min_layer must lie in 1..17, got {args.qa_min_layer}.")
    if not 0 <= args.qa_threshold <= 1:
        raise ValueError(f"--qa_threshold must lie in [0, 1], got {args.qa_threshold}.")
    if args.adapt_lr <= 0:
        raise ValueError(f"--adapt_lr must be positive, got {args.adapt_lr}.")
    data_dir = ROOT / args.data_dir
    files = {"squad": data_dir / SQUAD_ZIP, "wmt22": data_dir / WMT_FILE}
    for corpus, path in files.items():
        if not path.is_file():
            raise ValueError(f"--data_dir {args.data_dir}: {path} does not exist ({corpus} data).")
    return files


# ----- texts -------------------------------------------------------------------------------------------
def squad_contexts(zip_path: Path, count: int) -> List[str]:
    """The first context of each article, in file order (unzipped to a temporary folder only)."""
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(zip_path) as archive:
            name = next(n for n in archive.namelist() if n.endswith(".json"))
            path = archive.extract(name, tmp)
        with open(path, encoding="utf-8") as handle:
            articles = json.load(handle)["data"]
    return [article["paragraphs"][0]["context"] for article in articles[:count]]


def wmt_passages(path: Path, count: int, tokenizer, tokens: int) -> List[str]:
    """German passages: consecutive de2en sources joined until a passage has `tokens` tokens."""
    passages, current = [], []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            if row["direction"] != "de2en":
                continue
            current.append(row["src"])
            if len(tokenizer(" ".join(current))["input_ids"]) >= tokens:
                passages.append(" ".join(current))
                current = []
                if len(passages) == count:
                    break
    return passages


def load_texts(files: Dict[str, Path], args: RealLLMArguments, tokenizer) -> List[Tuple[str, torch.Tensor]]:
    """(corpus, ids (1, text_tokens)) of every text; a text shorter than text_tokens is refused."""
    texts = {"squad": squad_contexts(files["squad"], args.squad_texts),
             "wmt22": wmt_passages(files["wmt22"], args.wmt_texts, tokenizer, args.text_tokens)}
    out = []
    for corpus in CORPORA:
        for text in texts[corpus]:
            ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :args.text_tokens]
            if ids.shape[1] < args.text_tokens:
                raise ValueError(f"a {corpus} text has {ids.shape[1]} tokens, fewer than --text_tokens "
                                 f"{args.text_tokens}: {text[:60]!r}")
            out.append((corpus, ids))
    return out


# ----- the model's read-out ----------------------------------------------------------------------
def head_logits(model, normed: torch.Tensor) -> torch.Tensor:
    """The model's own head on a normed state, with its final soft-capping if it has one."""
    logits = model.lm_head(normed)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap is not None else logits


def layer_logits(model, hidden_states: Tuple[torch.Tensor, ...], layer: int) -> torch.Tensor:
    """z_l for layer l (1-based). HF's hidden_states holds the embeddings first, then every layer's
    output; its last entry is the final norm's output already (transformers replaces it with
    last_hidden_state), so only the earlier layers are normed here."""
    num_layers = len(hidden_states) - 1
    state = hidden_states[layer]
    return head_logits(model, state if layer == num_layers else model.model.norm(state))


@torch.no_grad()
def text_records(model, ids: torch.Tensor, alpha: float) -> dict:
    """Per token t and layer l (arrays T x L): rank of the final prediction in z_l, softmax
    confidence, max probability, agreement with the final layer, next-token correctness and
    cross-entropy against the text (T - 1 rows), and discounted JSD of layers 2..L-1 against L."""
    out = model(input_ids=ids, output_hidden_states=True)
    states = out.hidden_states
    num_layers = len(states) - 1
    final = layer_logits(model, states, num_layers)[0]
    if not torch.equal(final, out.logits[0].to(final.dtype)):  # the read-out must be the model's own
        raise RuntimeError("z_L differs from the model's logits: the read-out is not the model's own head.")
    prediction = final.argmax(-1)
    targets = ids[0, 1:]
    final_probs = F.softmax(final.float(), -1)
    heads = [plausibility_head(final_probs[t], alpha) for t in range(len(prediction))]
    T = ids.shape[1]
    rec = {k: np.zeros((T, num_layers)) for k in ("ranks", "confidences", "max_probs", "agrees")}
    rec["next_correct"] = np.zeros((T - 1, num_layers))
    rec["next_ce"] = np.zeros((T - 1, num_layers))
    amateurs = [[] for _ in range(T)]  # per token: z_j on its head, j = 2..L-1
    for layer in range(1, num_layers + 1):
        z = final if layer == num_layers else layer_logits(model, states, layer)[0]
        chosen = z.gather(-1, prediction[:, None])
        rec["ranks"][:, layer - 1] = (z > chosen).sum(-1).numpy()
        log_probs = F.log_softmax(z.float(), -1)
        top = log_probs.topk(2, dim=-1)
        first, second = top.values.exp().unbind(-1)
        rec["confidences"][:, layer - 1] = (first - second).numpy()  # softmax_confidence, one softmax shared
        rec["max_probs"][:, layer - 1] = first.numpy()
        best = z.argmax(-1)  # as the prediction (topk may order ties otherwise)
        rec["agrees"][:, layer - 1] = (best == prediction).numpy()
        rec["next_correct"][:, layer - 1] = (best[:-1] == targets).numpy()
        rec["next_ce"][:, layer - 1] = -log_probs[:-1].gather(-1, targets[:, None])[:, 0].numpy()
        if 2 <= layer < num_layers:
            for t in range(T):
                amateurs[t].append(z[t, heads[t]])
    rec["jsd"] = np.full((T, num_layers), np.nan)
    candidates = torch.arange(2, num_layers)
    for t in range(T):
        if len(candidates):
            jsd = restricted_jsd(final[t, heads[t]], torch.stack(amateurs[t]))
            rec["jsd"][t, 1:num_layers - 1] = discounted_jsd(jsd, candidates, num_layers).numpy()
    rec["predictions"] = prediction.tolist()  # what the model would write after each position
    return rec


# ----- the cost of a confidence check ------------------------------------------------------------
def gemma_shape(config) -> Shape:
    return Shape(d_model=config.hidden_size, inner=config.num_attention_heads * config.head_dim,
                 d_ff=config.intermediate_size, ff_matrices=3, vocab_size=config.vocab_size, encoder_layers=0)


def layer_flops(config, layer: int, positions: int) -> int:
    """One decoder layer (1-based) for one new token attending to `positions` positions (a sliding
    layer to at most sliding_window): q, k, v, o projections (grouped-query: k and v have
    num_key_value_heads heads), attention, and the gated feed-forward (3 matrices). Norms and
    rotary embeddings are left out (O(d) each)."""
    d, hd = config.hidden_size, config.head_dim
    q_inner, kv_inner = config.num_attention_heads * hd, config.num_key_value_heads * hd
    if config.layer_types[layer - 1] == "sliding_attention":
        positions = min(positions, config.sliding_window)
    projections = 2 * d * q_inner * 2 + 2 * d * kv_inner * 2
    attention = 4 * q_inner * positions
    return projections + attention + 2 * d * config.intermediate_size * 3


def reduced_sizes(args: RealLLMArguments, num_layers: int, vocab: int, confidences: np.ndarray
                  ) -> Dict[str, List[float]]:
    """Rows of W scored at each checked layer l = m..L-1 under each reduction (the start layer m
    scores the full head); `adaptive` is the mean over the traced tokens of its size, which
    depends on the previous layer's confidence."""
    start = args.exit_min_layer
    k_start = schedule(start, num_layers, args.vocab_k_max, args.vocab_k_min, vocab)
    sizes = {name: [] for name in REDUCTIONS}
    for layer in range(start, num_layers):
        sizes["full"].append(vocab)
        if layer == start:
            for name in REDUCTIONS[1:]:
                sizes[name].append(vocab)
            continue
        sizes["fixed"].append(k_start)
        sizes["decaying"].append(schedule(layer, num_layers, args.vocab_k_max, args.vocab_k_min, k_start))
        previous = confidences[:, layer - 2]
        sizes["adaptive"].append(float(np.mean([adaptive_size(k_start, args.vocab_k_min, args.vocab_adaptive_scale, c)
                                                for c in previous])))
    return sizes


def _median_times(jobs: Dict[str, Callable[[], None]], rounds: int) -> Dict[str, float]:
    """Median seconds of each job, the jobs interleaved in rounds (after one warm-up each)."""
    for job in jobs.values():
        job()
    times = {name: [] for name in jobs}
    for _ in range(rounds):
        for name, job in jobs.items():
            start = time.perf_counter()
            job()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


@torch.no_grad()
def measure_costs(model, prefix: torch.Tensor, sizes: Dict[str, List[float]], args: RealLLMArguments) -> dict:
    """Time of one decode step of the layer stack (one new token after `prefix`, KV cache), per
    layer, against the time of one confidence check (final norm, head over k rows, softmax, top-2
    gap) for every k used, and of the reduction's start (full head, top-k(m), gathering the rows)."""
    from transformers import DynamicCache

    config = model.config
    num_layers = config.num_hidden_layers
    cache = DynamicCache(config=config)
    cache.activate_past_recording()  # sliding layers keep what crop(-1) needs, past the window too
    model.model(input_ids=prefix, past_key_values=cache, use_cache=True)
    context = prefix.shape[1]
    step = prefix[:, -1:]
    position = torch.tensor([[context]])

    def stack_step():
        model.model(input_ids=step, past_key_values=cache, position_ids=position, use_cache=True)
        cache.crop(-1)

    hidden = model.model(input_ids=step, past_key_values=cache, position_ids=position, use_cache=True).last_hidden_state
    cache.crop(-1)
    weight = model.lm_head.weight
    normed = model.model.norm(hidden)
    order = head_logits(model, normed)[0, 0].argsort(descending=True)
    k_start = sizes["fixed"][1] if len(sizes["fixed"]) > 1 else config.vocab_size
    row_sets = {}
    for k in sorted({int(round(k)) for values in sizes.values() for k in values}):
        row_sets[k] = weight.index_select(0, order[:k]).contiguous()

    def check(rows):
        return lambda: softmax_confidence(F.linear(model.model.norm(hidden), rows))

    def start():
        logits = head_logits(model, model.model.norm(hidden))
        softmax_confidence(logits)
        weight.index_select(0, logits.topk(k_start, dim=-1).indices.flatten())

    jobs = {"stack": stack_step, "start": start}
    jobs.update({f"head_{k}": check(rows) for k, rows in row_sets.items()})
    times = _median_times(jobs, args.timing_rounds)
    layer_time = times["stack"] / num_layers  # embedding and final norm are O(d): left in
    shape = gemma_shape(config)
    per_layer = []
    checked = list(range(args.exit_min_layer, num_layers))
    mean_layer_flops = statistics.mean(layer_flops(config, layer, context + 1) for layer in range(1, num_layers + 1))
    for i, layer in enumerate(checked):
        row = {"layer": layer, "layer_flops": layer_flops(config, layer, context + 1)}
        for name in REDUCTIONS:
            k = sizes[name][i]
            rows_timed = min(row_sets, key=lambda r: abs(r - k))  # adaptive: its mean size, rounded
            row[f"{name}_rows"] = k
            row[f"{name}_flops"] = head_flops(shape, k)  # the start layer's top-k and gather left out
            row[f"{name}_time_s"] = times[f"head_{rows_timed}"]
            if i == 0 and name != "full":  # the start layer: full head, top-k and the rows' gather
                row[f"{name}_time_s"] = times["start"]
            row[f"{name}_flops_fraction"] = row[f"{name}_flops"] / mean_layer_flops
            row[f"{name}_time_fraction"] = row[f"{name}_time_s"] / layer_time
        per_layer.append(row)
    totals = {"layers_checked": len(checked), "stack_flops": sum(layer_flops(config, l, context + 1)
                                                                 for l in range(1, num_layers + 1)),
              "stack_time_s": times["stack"]}
    for name in REDUCTIONS:
        totals[f"{name}_flops"] = sum(r[f"{name}_flops"] for r in per_layer)
        totals[f"{name}_time_s"] = sum(r[f"{name}_time_s"] for r in per_layer)
        totals[f"{name}_flops_vs_stack"] = totals[f"{name}_flops"] / totals["stack_flops"]
        totals[f"{name}_time_vs_stack"] = totals[f"{name}_time_s"] / totals["stack_time_s"]
    for name in REDUCTIONS[1:]:
        totals[f"{name}_time_vs_full"] = totals[f"{name}_time_s"] / totals["full_time_s"]
        totals[f"{name}_flops_vs_full"] = totals[f"{name}_flops"] / totals["full_flops"]
    return {"context_positions": context + 1, "layer_time_s": layer_time, "mean_layer_flops": mean_layer_flops,
            "full_head_flops": head_flops(shape, config.vocab_size), "timing_rounds": args.timing_rounds,
            "per_layer": per_layer, "totals": totals}


# ----- the diagnostics part ----------------------------------------------------------------------
def pooled(records: List[dict], key: str) -> np.ndarray:
    return np.concatenate([r[key] for r in records])


def layer_trace(records: List[dict], tokenizer) -> LayerTrace:
    ranks = pooled(records, "ranks")
    num_layers = ranks.shape[1]
    tokens = [tokenizer.decode([i]) for r in records for i in r["predictions"]]
    return LayerTrace(ranks=ranks.astype(int).tolist(), confidences=pooled(records, "confidences").tolist(),
                      max_probs=pooled(records, "max_probs").tolist(), agrees=pooled(records, "agrees").astype(bool).tolist(),
                      exit_layers=[num_layers] * len(ranks), num_layers=num_layers, tokens=tokens)


def jsd_trace(record: dict, tokenizer) -> JsdTrace:
    """One text's JSD records, labelled by the final layer's prediction at each position."""
    num_layers = record["jsd"].shape[1]
    steps = []
    for row in record["jsd"]:
        jsd = {layer: row[layer - 1] for layer in range(2, num_layers)}
        steps.append(JsdStep(jsd=jsd, chosen=max(jsd, key=jsd.get), expert_layer=num_layers))
    return JsdTrace(steps=steps, tokens=[tokenizer.decode([i]) for i in record["predictions"]])


def corpus_summary(records: List[dict], tokenizer) -> dict:
    trace = layer_trace(records, tokenizer)
    jsd = pooled(records, "jsd")
    num_layers = trace.num_layers
    chosen = np.nanargmax(jsd[:, 1:num_layers - 1], axis=1) + 2
    return {
        "texts": len(records), "tokens": trace.num_tokens,
        "per_layer": layer_summary(trace),
        "overall_ece": overall_ece(trace),
        "next_token_accuracy": pooled(records, "next_correct").mean(0).tolist(),
        "next_token_ce": pooled(records, "next_ce").mean(0).tolist(),
        "mean_discounted_jsd": [None] + np.nanmean(jsd[:, 1:num_layers - 1], 0).tolist() + [None],
        "jsd_chosen_layer_counts": {int(layer): int((chosen == layer).sum()) for layer in range(2, num_layers)},
    }


def cost_figure(costs: dict):
    """A confidence check's cost per checked layer, as a fraction of one layer (FLOPs, time)."""
    fig, axes = new_figure(12.0, 4.5, ncols=2)
    layers = [r["layer"] for r in costs["per_layer"]]
    for ax, unit in zip(axes, ("flops", "time")):
        for name in REDUCTIONS:
            ax.plot(layers, [r[f"{name}_{unit}_fraction"] for r in costs["per_layer"]], "o-", label=name)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8, label="one layer")
        ax.set_yscale("log")
        ax.set_xlabel("checked layer")
        ax.set_ylabel(f"check {unit} / one layer's {unit}")
        ax.set_title(f"Confidence check cost ({'FLOPs' if unit == 'flops' else 'CPU time'})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def run_diagnostics(model, tokenizer, args: RealLLMArguments, files: Dict[str, Path]) -> dict:
    texts = load_texts(files, args, tokenizer)
    records = {corpus: [] for corpus in CORPORA}
    start = time.perf_counter()
    for corpus, ids in tqdm(texts, desc="diagnostics: texts"):
        records[corpus].append(text_records(model, ids, args.cd_alpha))
    forward_seconds = time.perf_counter() - start
    everything = records["squad"] + records["wmt22"]
    summary = {corpus: corpus_summary(records[corpus], tokenizer) for corpus in CORPORA}
    summary["pooled"] = corpus_summary(everything, tokenizer)
    sizes = reduced_sizes(args, model.config.num_hidden_layers, model.config.vocab_size,
                          pooled(everything, "confidences"))
    print("timing the confidence checks ...", file=sys.stderr)
    costs = measure_costs(model, texts[0][1], sizes, args)
    plots = Path(args.plots_dir)
    name = f"Gemma 3 270M, {len(texts)} texts"
    trace = layer_trace(everything, tokenizer)
    accuracy = {layer + 1: v for layer, v in enumerate(summary["pooled"]["next_token_accuracy"])}
    paths = [save_figure(rank_figure(trace, name), plots / "ranks_per_layer.png"),
             save_figure(calibration_figure(trace, run_name=name), plots / "calibration.png"),
             save_figure(static_exit_figure(accuracy, "next-token accuracy (teacher-forced)",
                                            trace.num_layers, name), plots / "static_exit_next_token.png"),
             save_figure(cost_figure(costs), plots / "confidence_cost.png")]
    for corpus in CORPORA:
        paths.append(save_figure(jsd_heatmap_figure(jsd_trace(records[corpus][0], tokenizer),
                                                    run_name=f"Gemma 3 270M, first {corpus} text"),
                                 plots / f"jsd_heatmap_{corpus}.png"))
    return {"texts": {c: len(records[c]) for c in CORPORA}, "text_tokens": args.text_tokens,
            "forward_seconds": forward_seconds, "summary": summary, "cost": costs,
            "plots": [str(p) for p in paths]}


# ----- the early-exit tables ------------------------------------------------------------------------
def _layers(text: str) -> List[int]:
    return [int(x) for x in text.split(",")]


def qa_data(args: RealLLMArguments, files: Dict[str, Path]):
    """(evaluation questions, few-shot examples, training examples): evaluation from the first half
    of the articles, the others from the second half."""
    from util.real_llm_qa import examples, load_articles, split_articles

    evaluation, apart = split_articles(load_articles(files["squad"]))
    held = examples(apart, args.qa_shots + args.adapt_examples, per_paragraph=3)
    return examples(evaluation, args.qa_questions), held[:args.qa_shots], held[args.qa_shots:]


def _qa_part(model, tokenizer, args: RealLLMArguments, files: Dict[str, Path], desc: str) -> dict:
    from util.real_llm_qa import qa_table, settings

    questions, shots, _ = qa_data(args, files)
    # an answer ends at its line: "\n", "\n\n" and "\n\n\n" are single tokens of their own
    newlines = [i for text in ("\n", "\n\n", "\n\n\n") for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id] + newlines
    rows = settings(model.config.num_hidden_layers, _layers(args.qa_shallow_layers), _layers(args.qa_static_layers),
                    args.qa_min_layer, args.qa_threshold, args.qa_draft_vocab or None)
    return qa_table(model, tokenizer, questions, shots, rows, args.qa_new_tokens, desc)


def run_early_exit(model, tokenizer, args: RealLLMArguments, files: Dict[str, Path]) -> dict:
    return _qa_part(_deploy(model), tokenizer, args, files, "early exit: questions")


def _deploy(model):
    """The same weights, loaded in the early-exit class (its generate; HF's forward)."""
    from models.deploying_causal import DeployGemma3ForCausalLM

    return DeployGemma3ForCausalLM.from_pretrained(model.name_or_path).eval()


def run_adapted(model, tokenizer, args: RealLLMArguments, files: Dict[str, Path]) -> dict:
    from models.deploying_causal import DeployGemma3ForCausalLM
    from util.real_llm_qa import AdaptSettings, adapt

    _, _, train = qa_data(args, files)
    settings = AdaptSettings(steps=args.adapt_steps, lr=args.adapt_lr, lora_rank=args.adapt_lora_rank,
                             rotation=args.adapt_rotation)
    base = Path(model.name_or_path)
    folder = ROOT / args.adapt_dir / f"gemma3-layerskip-{settings.key(base, train)}"
    if (folder / "adaptation.json").is_file():
        print(f"adapted model cached: {folder}", file=sys.stderr)
        record = json.loads((folder / "adaptation.json").read_text())
    else:
        record = adapt(base, tokenizer, train, settings, folder)
    adapted = DeployGemma3ForCausalLM.from_pretrained(folder).eval()
    adapted.generation_config = model.generation_config
    table = _qa_part(adapted, tokenizer, args, files, "adapted: questions")
    return {"adaptation": record, "folder": str(folder), **table}


def tradeoff_figure(tables: Dict[str, dict]):
    """F1 against decode speed (tokens/s over the full model's, prefill excluded) of every setting,
    one marker style per table (as the model is / adapted)."""
    fig, axes = new_figure(7.5, 5.0)
    ax = axes[0]
    for (label, table), marker in zip(tables.items(), ("o", "s")):
        for name, row in table["rows"].items():
            if row["decode_speed_vs_full_wall"] is None:
                continue
            ax.scatter(row["decode_speed_vs_full_wall"], row["f1"], marker=marker,
                       color="tab:blue" if marker == "o" else "tab:orange")
            ax.annotate(name, (row["decode_speed_vs_full_wall"], row["f1"]), fontsize=6)
        ax.scatter([], [], marker=marker, color="tab:blue" if marker == "o" else "tab:orange", label=label)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=0.8)
    ax.set_xlabel("decode tokens/s / full model's (wall, prefill excluded)")
    ax.set_ylabel("SQuAD F1")
    ax.set_title("Gemma 3 270M, few-shot SQuAD: quality against speed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


PARTS = {"diagnostics": run_diagnostics, "early_exit": run_early_exit, "adapted": run_adapted}


# ----- the report --------------------------------------------------------------------------------
def model_facts(model) -> dict:
    config = model.config
    return {
        "model_type": config.model_type, "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size, "vocab_size": config.vocab_size,
        "layer_types": config.layer_types, "sliding_window": config.sliding_window,
        "rope_parameters": config.rope_parameters, "head_dim": config.head_dim,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "query_pre_attn_scalar": config.query_pre_attn_scalar,
        "final_logit_softcapping": config.final_logit_softcapping,
        "attn_logit_softcapping": config.attn_logit_softcapping,
        "tie_word_embeddings": config.tie_word_embeddings,
        "dtype": str(model.dtype).replace("torch.", ""),
        "parameters": sum(p.numel() for p in model.parameters()),
        "layer_parameters": sum(p.numel() for p in model.model.layers.parameters()),
    }


def diagnostics_markdown(result: dict) -> str:
    pooled_rows = result["summary"]["pooled"]["per_layer"]
    acc = result["summary"]["pooled"]["next_token_accuracy"]
    lines = ["| layer | agrees with final | median rank | mean confidence | ECE | next-token acc. |",
             "|---:|---:|---:|---:|---:|---:|"]
    for row, a in zip(pooled_rows, acc):
        lines.append(f"| {row['layer']} | {row['accuracy']:.3f} | {row['rank_q50']:.0f} | "
                     f"{row['mean_confidence']:.3f} | {row['ece']:.3f} | {a:.3f} |")
    cost = result["cost"]
    lines += ["", "| checked layer | " + " | ".join(f"{n} rows | {n} FLOPs / layer | {n} time / layer"
                                                   for n in REDUCTIONS) + " |",
              "|---:|" + "---:|" * (3 * len(REDUCTIONS))]
    for row in cost["per_layer"]:
        cells = []
        for n in REDUCTIONS:
            cells += [f"{row[f'{n}_rows']:.0f}", f"{row[f'{n}_flops_fraction']:.2f}", f"{row[f'{n}_time_fraction']:.2f}"]
        lines.append(f"| {row['layer']} | " + " | ".join(cells) + " |")
    totals = cost["totals"]
    lines += ["", "Every layer checked, against the layer stack: " + ", ".join(
        f"{n} {totals[f'{n}_flops_vs_stack']:.2f}x FLOPs / {totals[f'{n}_time_vs_stack']:.2f}x time"
        for n in REDUCTIONS)]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> dict:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(RealLLMArguments).parse_args_into_dataclasses(args=argv)
    files = check_arguments(args)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer, folder = load_gguf_model(args.gguf_file)
    load_seconds = time.perf_counter() - start
    results = {"model": model_facts(model), "model_folder": str(folder), "load_seconds": load_seconds,
               "arguments": asdict(args),
               "environment": {"python": platform.python_version(), "torch": torch.__version__,
                               "transformers": transformers.__version__, "threads": args.threads,
                               "note": "2 CPU cores shared with other work: timings are noisy"}}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for part in args.parts.split(","):
        results[part] = PARTS[part](model, tokenizer, args, files)
        if part == "diagnostics":
            (out / "diagnostics.md").write_text(diagnostics_markdown(results[part]))
        else:
            from util.real_llm_qa import table_markdown

            (out / f"{part}.md").write_text(table_markdown(results[part]))
            print(table_markdown(results[part]), file=sys.stderr)
        (out / "results.json").write_text(json.dumps(_json_safe(results), indent=1, allow_nan=False))
    tables = {label: results[part] for part, label in (("early_exit", "as it is"), ("adapted", "adapted"))
              if part in results}
    if tables:
        results["qa_plot"] = str(save_figure(tradeoff_figure(tables), Path(args.plots_dir) / "qa_tradeoff.png"))
    (out / "results.json").write_text(json.dumps(_json_safe(results), indent=1, allow_nan=False))
    print(f"wrote {out / 'results.json'}")
    return results


def _json_safe(value):
    """NaN (an ECE of no pair) as null, numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


if __name__ == "__main__":
    run_entry_point(main)
