"""A copy task and a tiny T5 trained on it in seconds: the smallest model on which early exit
does something real. Each source token is copied and followed by its successor (x, x+1): the
successor is predictable from the previous output alone, so shallow layers are confident on it,
while a copied token needs the encoder and deeper layers."""

import torch
import torch.nn.functional as F
from transformers import T5Config, T5ForConditionalGeneration

from models.decode_loop import output_logits

PAD, EOS = 0, 1


def copy_config(**overrides) -> T5Config:
    settings = dict(vocab_size=32, d_model=64, d_kv=8, d_ff=128, num_layers=2, num_decoder_layers=4,
                    num_heads=4, dropout_rate=0.0, decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS)
    settings.update(overrides)
    return T5Config(**settings)


def copy_batch(generator: torch.Generator, batch: int, length: int, vocab: int):
    """Random sources; the target is x1, x1+1, x2, x2+1, ..., EOS."""
    source = torch.randint(2, vocab - 1, (batch, length), generator=generator)
    pairs = torch.stack([source, source + 1], dim=-1).flatten(1)
    labels = torch.cat([pairs, torch.full((batch, 1), EOS)], dim=1)
    return source, labels


def train_copy_model(config: T5Config, steps: int = 150, seed: int = 0, length: int = 5, lengths=None,
                     model_class=T5ForConditionalGeneration):
    """Train with the loss of every decoder layer's output (each through the model's own head),
    so that intermediate layers become confident on some tokens and not on others. With
    `lengths`, the source length cycles through them step by step (outputs of several lengths).
    `model_class`: any T5-family class whose decoder is T5's (LongT5 with a LongT5Config)."""
    torch.manual_seed(seed)
    model = model_class(config)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        n = lengths[step % len(lengths)] if lengths else length
        source, labels = copy_batch(generator, 32, n, config.vocab_size)
        out = model(input_ids=source, labels=labels, output_hidden_states=True)
        loss = out.loss
        # decoder_hidden_states: embeddings, blocks 1..L-1 raw, block L after the final norm
        for hidden in out.decoder_hidden_states[1:-1]:
            loss = loss + F.cross_entropy(output_logits(model, hidden).flatten(0, 1), labels.flatten())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()
