"""Few-shot SQuAD question answering with early exit on a real causal LM (src/real_llm.py's
early-exit and adapted parts), and the short LoRA adaptation those parts compare against.

Data: SQuAD v1.1 dev, unzipped to a temporary folder at run time. Articles are split in two: the
evaluation questions come from the first half, the few-shot examples and the adaptation's training
examples from the second half, so no evaluation article is ever trained on or shown as an example.
The context of each question is the sentence of its paragraph that holds the first answer (a
short prompt keeps the run in minutes; the model still has to find the span in it).
"""

import hashlib
import json
import re
import statistics
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from util.additional_args import AdditionalArguments
from util.metrics import squad_metrics

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass
class QAExample:
    context: str
    question: str
    answers: List[str]


def load_articles(zip_path: Path) -> List[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(zip_path) as archive:
            name = next(n for n in archive.namelist() if n.endswith(".json"))
            path = archive.extract(name, tmp)
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)["data"]


def answer_sentence(context: str, start: int) -> str:
    """The sentence of `context` that holds the character `start`."""
    offset = 0
    for sentence in SENTENCE_END.split(context):
        offset = context.index(sentence, offset)
        if offset <= start < offset + len(sentence):
            return sentence
        offset += len(sentence)
    return context


def examples(articles: List[dict], count: int, per_paragraph: int = 1) -> List[QAExample]:
    """Up to `per_paragraph` questions of each paragraph, articles taken in turn (round robin), so
    that a small count still spans many articles; only questions whose answers lie in one sentence."""
    queues = []
    for article in articles:
        queue = []
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"][:per_paragraph]:
                first = qa["answers"][0]
                sentence = answer_sentence(paragraph["context"], first["answer_start"])
                if first["text"] in sentence and len(sentence) < 400:
                    queue.append(QAExample(sentence, qa["question"], [a["text"] for a in qa["answers"]]))
        queues.append(queue)
    out = []
    while len(out) < count and any(queues):
        for queue in queues:
            if queue and len(out) < count:
                out.append(queue.pop(0))
    return out


def split_articles(articles: List[dict]) -> Tuple[List[dict], List[dict]]:
    """(evaluation articles, held-apart articles for few-shot examples and training)."""
    half = len(articles) // 2
    return articles[:half], articles[half:]


def format_example(example: QAExample, with_answer: bool) -> str:
    text = f"Context: {example.context}\nQuestion: {example.question}\nAnswer:"
    return text + (f" {example.answers[0]}\n" if with_answer else "")


def few_shot_prompt(shots: List[QAExample], example: QAExample) -> str:
    return "".join(format_example(s, True) + "\n" for s in shots) + format_example(example, False)


# ----- the settings of the table -------------------------------------------------------------------
def settings(num_layers: int, shallow_layers: List[int], static_layers: List[int], min_layer: int,
             threshold: float, draft_vocab: Optional[int] = None) -> Dict[str, Optional[AdditionalArguments]]:
    """name -> flags (None: the full model through our loop). `check-all` rows check every layer
    and never exit (threshold 1: the top-2 gap never exceeds 1), so their tokens are the full
    model's and their time difference is the confidence checks' cost. With `draft_vocab`, each
    self-speculation row has a twin drafting from that many head rows."""
    rows: Dict[str, Optional[AdditionalArguments]] = {"full": None}
    for layer in static_layers:
        rows[f"static {layer}"] = AdditionalArguments(static_exit_layer=layer)
    rows["check-all full head"] = AdditionalArguments(use_early_exit=True, exit_conf_type="softmax",
                                                      exit_conf_threshold=1.0, exit_min_layer=1)
    rows["check-all decaying"] = AdditionalArguments(use_early_exit=True, exit_conf_type="softmax",
                                                     exit_conf_threshold=1.0, exit_min_layer=1,
                                                     type_vocab_reduct="decaying")
    rows["softmax 0.9 from 1"] = AdditionalArguments(use_early_exit=True, exit_conf_type="softmax",
                                                     exit_conf_threshold=0.9, exit_min_layer=1)
    rows[f"softmax {threshold} from {min_layer}"] = AdditionalArguments(
        use_early_exit=True, exit_conf_type="softmax", exit_conf_threshold=threshold, exit_min_layer=min_layer)
    rows[f"softmax {threshold} from {min_layer} decaying"] = AdditionalArguments(
        use_early_exit=True, exit_conf_type="softmax", exit_conf_threshold=threshold, exit_min_layer=min_layer,
        type_vocab_reduct="decaying")
    rows[f"contrastive {threshold} from {min_layer}"] = AdditionalArguments(
        use_early_exit=True, exit_conf_type="contrastive_decoding", exit_conf_threshold=threshold,
        exit_min_layer=min_layer)
    rows[f"FREE shallow-deep {min_layer}"] = AdditionalArguments(
        use_shallow_deep=True, shallow_exit_layer=min_layer, shallow2deep_conf_type="softmax",
        shallow2deep_conf_threshold=threshold)
    for layer in shallow_layers:
        for size in (None, draft_vocab) if draft_vocab else (None,):
            name = f"self-spec {layer}" + (f" draft {size}" if size else "")
            rows[name] = AdditionalArguments(
                use_shallow_deep=True, shallow_exit_layer=layer, shallow2deep_conf_type="softmax",
                shallow2deep_conf_threshold=0.5, use_self_speculation=True, max_draft_tokens=3,
                draft_vocab_size=size)
    return rows


def hf_generate(model, batch, max_new_tokens: int) -> torch.Tensor:
    """HF's own generate on the same weights (the deploy class replaces only `generate`)."""
    from transformers import GenerationMixin

    return GenerationMixin.generate(model, **batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                          pad_token_id=model.config.pad_token_id)


@torch.no_grad()
def qa_table(model, tokenizer, questions: List[QAExample], shots: List[QAExample], rows: Dict, max_new_tokens: int,
             desc: str, with_hf: bool = True) -> dict:
    """Every setting on every question, interleaved (per question, each setting once, the order
    rotated by one each question), after one warm-up call of the full model. Times: wall and CPU
    (process_time) per call; tokens/s is summed new tokens over summed time."""
    names = list(rows) + (["HF generate"] if with_hf else [])
    record = {n: {"answers": [], "tokens": [], "wall": [], "cpu": [], "prefill": [], "block_avg": [], "acceptance": []} for n in names}
    prompts = [few_shot_prompt(shots, q) for q in questions]

    def run(name, batch):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        if name == "HF generate":
            out = hf_generate(model, batch, max_new_tokens)
            stats = {}
        else:
            out = model.generate(**batch, max_new_tokens=max_new_tokens, exit_args=rows[name])
            stats = model.exit_stats()
        wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
        new = out[0, batch["input_ids"].shape[1]:].tolist()
        eos = model.generation_config.eos_token_id
        eos = set(eos) if isinstance(eos, list) else {eos}
        cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
        return new[:cut], wall, cpu, stats

    run("full", tokenizer(prompts[0], return_tensors="pt"))  # one warm-up call (first-call overheads)
    for i, prompt in enumerate(tqdm(prompts, desc=desc)):
        batch = tokenizer(prompt, return_tensors="pt")
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            tokens, wall, cpu, stats = run(name, batch)
            r = record[name]
            r["tokens"].append(tokens)
            r["answers"].append(tokenizer.decode(tokens, skip_special_tokens=True).split("\n")[0].strip())
            r["wall"].append(wall)
            r["cpu"].append(cpu)
            r["prefill"].append(stats.get("time_prefill"))
            r["block_avg"].append(stats.get("block_avg"))
            r["acceptance"].append(stats.get("acceptance_rate"))
    full = record["full"]
    out = {}
    for name in names:
        r = record[name]
        n_tokens = sum(len(t) for t in r["tokens"])
        metrics = squad_metrics(r["answers"], [q.answers for q in questions])
        same = [a == b for a, b in zip(r["tokens"], full["tokens"])]
        agree = [sum(x == y for x, y in zip(a, b)) / max(len(a), len(b)) for a, b in zip(r["tokens"], full["tokens"])]
        accept = [a for a in r["acceptance"] if a is not None]
        blocks = [b for b in r["block_avg"] if b is not None]
        out[name] = {
            "flags": None if name in ("full", "HF generate") else {k: v for k, v in vars(rows[name]).items()
                                                                   if v != getattr(AdditionalArguments(), k)},
            "f1": metrics["f1"], "exact_match": metrics["exact_match"],
            "same_output_as_full": sum(same) / len(same), "token_agreement": statistics.mean(agree),
            "new_tokens": n_tokens, "wall_s": sum(r["wall"]), "cpu_s": sum(r["cpu"]),
            "tokens_per_s_wall": n_tokens / sum(r["wall"]), "tokens_per_s_cpu": n_tokens / sum(r["cpu"]),
            "decode_wall_s": None if name == "HF generate" else sum(r["wall"]) - sum(r["prefill"]),
            "block_avg": statistics.mean(blocks) if blocks else None,
            "acceptance_rate": statistics.mean(accept) if accept else None,
            "answers": r["answers"],
        }
    for name in names:  # speed against the full model through our loop, same questions, same rounds
        o = out[name]
        o["speed_vs_full_wall"] = full_ratio(o, out["full"], "wall_s")
        o["speed_vs_full_cpu"] = full_ratio(o, out["full"], "cpu_s")
        # the prompt's prefill is the same full-depth pass in every setting: the decode steps alone
        o["decode_speed_vs_full_wall"] = None if o["decode_wall_s"] is None else full_ratio(o, out["full"], "decode_wall_s")
    return {"questions": len(questions), "shots": len(shots), "max_new_tokens": max_new_tokens, "rows": out}


def full_ratio(row: dict, full: dict, key: str) -> float:
    """tokens/s of this row over the full model's (>1: faster)."""
    return (row["new_tokens"] / row[key]) / (full["new_tokens"] / full[key])


def table_markdown(result: dict) -> str:
    lines = [f"{result['questions']} questions, {result['shots']}-shot, at most {result['max_new_tokens']} new "
             "tokens (end at a newline). Speed = tokens/s over the full model's (our loop), summed over the "
             "interleaved calls; CPU = process_time of the whole call, wall = perf_counter; decode = wall time "
             "without the prompt's prefill (the same full-depth pass in every setting).", "",
             "| setting | F1 | EM | same output as full | token agreement | mean blocks | acceptance | "
             "speed (CPU) | speed (wall) | decode speed (wall) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in result["rows"].items():
        blocks = "" if r["block_avg"] is None else f"{r['block_avg']:.1f}"
        accept = "" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        decode = "" if r["decode_speed_vs_full_wall"] is None else f"{r['decode_speed_vs_full_wall']:.2f}x"
        lines.append(f"| {name} | {r['f1']:.1f} | {r['exact_match']:.1f} | {r['same_output_as_full']:.2f} | "
                     f"{r['token_agreement']:.2f} | {blocks} | {accept} | {r['speed_vs_full_cpu']:.2f}x | "
                     f"{r['speed_vs_full_wall']:.2f}x | {decode} |")
    return "\n".join(lines) + "\n"


# ----- the adaptation ------------------------------------------------------------------------------------
@dataclass
class AdaptSettings:
    steps: int
    lr: float
    lora_rank: int
    rotation: int
    seed: int = 0

    def key(self, base: Path, train: List[QAExample]) -> str:
        """The cache key: the base folder's name (models.gguf_cache names it by the model file's
        hash, so another checkout of the same model shares it), the settings, the training text."""
        text = json.dumps([base.name, vars(self), [format_example(e, True) for e in train]])
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def adapt(folder: Path, tokenizer, train: List[QAExample], settings: AdaptSettings, out_dir: Path, log=print) -> dict:
    """LayerSkip's early-exit loss (rotational curriculum: every `rotation`-th layer and the last
    at each step) with LoRA (rank `lora_rank` on every attention and MLP projection), AdamW, one
    training example per step, on CPU; merged and saved to out_dir. Returns the training record."""
    from transformers import AutoConfig

    from models.exit_training import layer_losses, prepare_for_training, save_checkpoint
    from models.modeling_causal import TrainGemma3ForCausalLM
    from util.additional_args import update_autoconfig

    torch.manual_seed(settings.seed)
    flags = AdditionalArguments(output_hidden_states_decoder=True, intermediate_loss_fn="layerskip",
                                early_exit_curriculum="rotational", early_exit_rotation_interval=settings.rotation,
                                use_lora=True, lora_rank=settings.lora_rank, lora_alpha=2 * settings.lora_rank,
                                lora_dropout=0.0,
                                lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"])
    config = update_autoconfig(AutoConfig.from_pretrained(folder), flags)
    base = TrainGemma3ForCausalLM.from_pretrained(folder, config=config)
    probe = [tokenizer(format_example(e, True), return_tensors="pt") for e in train[:4]]
    probe = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": b["input_ids"]}
             for b in probe]

    def mean_layer_losses(model):
        model.eval()
        losses = [layer_losses(model, b) for b in probe]
        return [statistics.mean(col) for col in zip(*losses)]

    before = mean_layer_losses(base)
    model = prepare_for_training(base)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr)
    model.train()
    losses, start = [], time.perf_counter()
    for step in tqdm(range(settings.steps), desc="adaptation (LoRA, LayerSkip loss)"):
        example = train[step % len(train)]
        batch = tokenizer(format_example(example, True), return_tensors="pt")
        model.base_model.model.set_training_progress(step, settings.steps)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    seconds = time.perf_counter() - start
    model = save_checkpoint(model, tokenizer, str(out_dir))
    after = mean_layer_losses(model)
    record = {"settings": vars(settings), "train_examples": len(train), "train_seconds": seconds,
              "trainable_parameters": sum(p.numel() for p in params), "losses": losses,
              "layer_ce_before": before, "layer_ce_after": after,
              "note": "per-layer CE on 4 training examples (teacher-forced, every position)"}
    (out_dir / "adaptation.json").write_text(json.dumps(record, indent=1))
    log(f"adapted in {seconds:.0f} s; saved {out_dir}")
    return record
