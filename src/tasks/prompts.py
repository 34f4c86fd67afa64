"""Prompts of decoder-only models in the task scripts: the template around each source, the
context budget, and the training sequences with the prompt masked out of the loss.

    prompt = prompt_format(tokenizer, "{source}\\nsummary:", budget=P - T, what="...")
    ids, truncated = prompt.encode(tokenizer, [source])       # the prompt's token ids
    features = causal_features(prompt, tokenizer, sources, targets, target_length)

A prompt is [bos] + template-before-{source} + source + template-after-{source}, each part
tokenised on its own (so that the source can be cut by tokens). It is at most `budget` tokens:
the smaller of the input-length argument and the model's positions less the target's room. A
longer source loses tokens from its left (its start); the template and the target are never cut.
"""

from dataclasses import dataclass
from typing import List, Sequence, Tuple

from models.exit_training import IGNORE

SOURCE_FIELD = "{source}"


def default_template(task_name: str, source_lang: str = "", target_lang: str = "") -> str:
    """The default template of each task (translation names its languages)."""
    if task_name == "question answering":
        return "{source}\nanswer:"
    if task_name == "summarization":
        return "{source}\nsummary:"
    return f"Translate {source_lang} to {target_lang}.\n{source_lang}: {{source}}\n{target_lang}:"


def check_template(template: str) -> None:
    count = template.count(SOURCE_FIELD)
    if count != 1:
        raise ValueError(f"--prompt_template {template!r} must contain {SOURCE_FIELD} exactly once "
                         f"(where each source goes); it contains it {count} times.")


def max_positions(config) -> int:
    """The model's context in tokens (Llama-style max_position_embeddings, GPT-2's n_positions)."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise ValueError(f"the '{config.model_type}' config states no context length (max_position_embeddings).")


def _bos(tokenizer) -> List[int]:
    """[bos] where the tokenizer itself starts every text with it (Llama), else []."""
    bos = tokenizer.bos_token_id
    probe = tokenizer("a")["input_ids"]
    return [bos] if bos is not None and probe and probe[0] == bos else []


def _ids(tokenizer, texts: Sequence[str]) -> List[List[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []


@dataclass
class PromptFormat:
    head: List[int]  # [bos] and the template before {source}
    tail: List[int]  # the template after {source}
    budget: int  # most prompt tokens

    @property
    def source_room(self) -> int:
        return self.budget - len(self.head) - len(self.tail)

    def encode(self, tokenizer, sources: Sequence[str]) -> Tuple[List[List[int]], List[bool]]:
        """Each source's prompt ids, and whether its source was cut (from the left) to fit."""
        room = self.source_room
        prompts, cut = [], []
        for ids in _ids(tokenizer, sources):
            cut.append(len(ids) > room)
            prompts.append(self.head + ids[max(0, len(ids) - room):] + self.tail)
        return prompts, cut


def prompt_format(tokenizer, template: str, budget: int, why: str) -> PromptFormat:
    """The template tokenised; an error when it leaves no token of the prompt's `budget` (explained
    by `why`) to the source."""
    check_template(template)
    before, after = template.split(SOURCE_FIELD)
    head = _bos(tokenizer) + (_ids(tokenizer, [before])[0] if before else [])
    tail = _ids(tokenizer, [after])[0] if after else []
    prompt = PromptFormat(head, tail, budget)
    if prompt.source_room < 1:
        raise ValueError(f"--prompt_template {template!r} takes {len(head) + len(tail)} tokens, which leaves "
                         f"nothing of the source in a prompt of at most {budget} tokens ({why}).")
    return prompt


def target_ids(tokenizer, targets: Sequence[str], target_length: int) -> List[List[int]]:
    """Each target's tokens and the end token, at most target_length in all (as T5's labels)."""
    return [ids[: target_length - 1] + [tokenizer.eos_token_id] for ids in _ids(tokenizer, targets)]


def causal_features(prompt: PromptFormat, tokenizer, sources: Sequence[str], targets: Sequence[str],
                    target_length: int) -> Tuple[dict, List[bool]]:
    """Training rows: input_ids = prompt + target + eos, labels the same with the prompt's
    positions IGNORE (the loss covers the target alone); returns them and whether each source was cut."""
    prompts, cut = prompt.encode(tokenizer, sources)
    features = {"input_ids": [], "attention_mask": [], "labels": []}
    for ids, answer in zip(prompts, target_ids(tokenizer, targets, target_length)):
        features["input_ids"].append(ids + answer)
        features["attention_mask"].append([1] * (len(ids) + len(answer)))
        features["labels"].append([IGNORE] * len(ids) + answer)
    return features, cut
