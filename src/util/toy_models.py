"""Tiny T5 and Llama models and tokenizers built offline, for tests and demos.

    tokenizer = train_toy_tokenizer(texts, vocab_size=300, save_dir=path)
    model = build_toy_t5(tokenizer, save_dir=path)   # path now loads with from_pretrained
    model = build_toy_llama(tokenizer, save_dir=path)   # a decoder-only model with the same tokenizer

The tokenizer follows T5's special-token layout (`<pad>` 0, `</s>` 1, `<unk>` 2, `</s>` appended
to every encoded text), so the model's pad, eos and decoder-start ids are T5's.
"""

import os
from typing import Iterable, Optional

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as in T5


def train_toy_tokenizer(texts: Iterable[str], vocab_size: int = 300,
                        save_dir: Optional[str] = None) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on `texts`, wrapped for transformers (saved to save_dir if given)."""
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_toy_tokenizer needs at least one non-empty text.")
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    # Metaspace keeps word boundaries in the pieces, so decoding restores the spaces.
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    eos_id = backend.token_to_id("</s>")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    if ids != [0, 1, 2]:
        raise RuntimeError(f"special tokens got ids {ids}, expected [0, 1, 2].")
    if save_dir is not None:
        tokenizer.save_pretrained(save_dir)
    return tokenizer


def _initialised(model_class, config, tokenizer, seed: int, save_dir: Optional[str]):
    """A model of `model_class` initialised from `seed`, in eval mode, saved with the tokenizer to
    save_dir if given."""
    torch.manual_seed(seed)
    model = model_class(config)
    model.eval()
    if save_dir is not None:
        os.makedirs(save_dir, exist_ok=True)
        model.save_pretrained(save_dir)
        tokenizer.save_pretrained(save_dir)
    return model


def build_toy_t5(tokenizer, d_model: int = 32, num_layers: int = 2, num_decoder_layers: Optional[int] = None,
                 num_heads: int = 2, d_kv: int = 16, d_ff: int = 64, seed: int = 0,
                 save_dir: Optional[str] = None) -> T5ForConditionalGeneration:
    """A randomly initialised T5 sized for `tokenizer` (saved with it to save_dir if given)."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=num_layers,
        num_decoder_layers=num_decoder_layers if num_decoder_layers is not None else num_layers,
        num_heads=num_heads,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return _initialised(T5ForConditionalGeneration, config, tokenizer, seed, save_dir)


def build_toy_llama(tokenizer, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2,
                    num_kv_heads: Optional[int] = None, intermediate_size: int = 64, max_positions: int = 256,
                    seed: int = 0, save_dir: Optional[str] = None) -> LlamaForCausalLM:
    """A randomly initialised Llama sized for `tokenizer` (no start token: prompts begin with
    their text), saved with it to save_dir if given."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return _initialised(LlamaForCausalLM, config, tokenizer, seed, save_dir)
