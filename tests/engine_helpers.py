"""Tiny T5 models and slow oracles shared by the engine's tests.

The oracles are deliberately naive: they run HF's own T5 modules over whole sequences without
any cache, so that they share nothing with the decode loop under test except the weights.
"""

from functools import lru_cache

import torch
from transformers import T5Config, T5ForConditionalGeneration

from models.confidence import meta_confidence, softmax_confidence, state_confidence
from models.decode_loop import output_logits
from models.deploying_t5 import DeployT5ForConditionalGeneration
from util.additional_args import AdditionalArguments, update_autoconfig
from util.copy_task import EOS, PAD, copy_config, train_copy_model  # noqa: F401  (re-exported)



def tiny_config(**overrides) -> T5Config:
    settings = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4,
                    dropout_rate=0.0, decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS)
    settings.update(overrides)
    return T5Config(**settings)


def deploy_model(config: T5Config, seed: int = 0, **flags) -> DeployT5ForConditionalGeneration:
    torch.manual_seed(seed)
    update_autoconfig(config, AdditionalArguments(**flags))
    return DeployT5ForConditionalGeneration(config).eval()


def set_flags(model, **flags) -> None:
    update_autoconfig(model.config, AdditionalArguments(**flags))


def hf_twin(model) -> T5ForConditionalGeneration:
    """A plain HF T5 with the same weights (the meta head, if any, left out)."""
    twin = T5ForConditionalGeneration(model.config).eval().to(model.dtype)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("cm_head")}
    twin.load_state_dict(state)
    return twin


def hf_greedy_without_cache(model, input_ids, max_new_tokens):
    """Greedy decoding by calling HF's full forward on the whole prefix at every step."""
    decoded = torch.tensor([[model.config.decoder_start_token_id]])
    for _ in range(max_new_tokens):
        logits = model(input_ids=input_ids, decoder_input_ids=decoded, use_cache=False).logits[:, -1]
        decoded = torch.cat([decoded, logits.argmax(-1, keepdim=True)], dim=1)
        if decoded[0, -1].item() == EOS:
            break
    return decoded


def causal_bias(model, length):
    """Relative position bias of the first decoder block with the causal mask folded in."""
    bias = model.decoder.block[0].layer[0].SelfAttention.compute_bias(length, length).to(model.dtype)
    future = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
    return bias.masked_fill(future, torch.finfo(model.dtype).min)


@torch.no_grad()
def reference_decode(model, input_ids, max_new_tokens, exit_rule):
    """Slow early-exit decoding with no cache.

    Block j sees, at every position, the state that entered it: the previous block's output
    for tokens that ran block j-1, and the copied exit state h_e for tokens that left earlier.
    Each step recomputes every block's attention over all positions from those states.
    `exit_rule(layer, hidden, previous, step)` says whether the token leaves after `layer`.
    Returns (tokens with the start token, exit layer per token).
    """
    encoder_states = model.encoder(input_ids=input_ids).last_hidden_state
    blocks = model.decoder.block
    inputs_per_block = [[] for _ in blocks]
    tokens, exits = [model.config.decoder_start_token_id], []
    for step in range(max_new_tokens):
        hidden = model.decoder.embed_tokens(torch.tensor([[tokens[-1]]]))
        previous, exit_layer = hidden, len(blocks)
        for j, block in enumerate(blocks):
            inputs_per_block[j].append(hidden)
            sequence = torch.cat(inputs_per_block[j], dim=1)
            out = block(sequence, position_bias=causal_bias(model, sequence.shape[1]),
                        encoder_hidden_states=encoder_states)[0]
            previous, hidden = hidden, out[:, -1:]
            if j + 1 < len(blocks) and exit_rule(j + 1, hidden, previous, step):
                exit_layer = j + 1
                break
        for j in range(exit_layer, len(blocks)):
            inputs_per_block[j].append(hidden)
        tokens.append(int(output_logits(model, hidden)[0, -1].argmax()))
        exits.append(exit_layer)
        if tokens[-1] == EOS:
            break
    return tokens, exits


def threshold_rule(model, conf_type, threshold, min_layer=1):
    """The early-exit rule of METHODS.md with a constant threshold, for the reference."""

    def rule(layer, hidden, previous, step):
        if layer < min_layer:
            return False
        if conf_type == "softmax":
            confidence = softmax_confidence(output_logits(model, hidden))
        elif conf_type == "state":
            confidence = state_confidence(hidden, previous)
        else:
            confidence = meta_confidence(model.cm_head, model.decoder.final_layer_norm(hidden))
        return confidence.item() > threshold

    return rule


@lru_cache(maxsize=None)
def _trained_copy_weights(num_decoder_layers: int, lengths=None):
    """Trained once per test session for each depth (training takes seconds)."""
    trained = train_copy_model(copy_config(num_decoder_layers=num_decoder_layers), lengths=lengths,
                               steps=300 if lengths else 150)
    return trained.config, {k: v.clone() for k, v in trained.state_dict().items()}


def trained_copy_model(num_decoder_layers: int = 4, dtype=torch.float32, lengths=None):
    """A fresh deploy model with the session's trained copy-task weights (encoder of 2 blocks);
    `lengths` (a tuple) trains on sources of those lengths, so outputs end at different steps."""
    config, state = _trained_copy_weights(num_decoder_layers, lengths)
    model = deploy_model(type(config).from_dict(config.to_dict()))
    model.load_state_dict(state)
    return model.to(dtype)


def planted_meta_head(model):
    """A meta head whose P(exit) varies strongly with the normalised state, so exits vary."""
    from models.confidence import build_meta_head

    torch.manual_seed(3)
    head = build_meta_head(model.config.d_model).to(model.dtype)
    with torch.no_grad():
        head[2].weight.mul_(20.0)
    return head


def assert_training_lowers_every_layers_loss(model, make_batch, steps: int) -> None:
    """A few AdamW steps on batches make_batch(seed) lower the loss of every decoder layer on a
    held-out batch (models.modeling_t5.layer_losses)."""
    from models.modeling_t5 import layer_losses

    held_out = make_batch(99)
    before = layer_losses(model.eval(), held_out)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        loss = model(**make_batch(step)).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    after = layer_losses(model.eval(), held_out)
    assert all(a < b for a, b in zip(after, before)), (before, after)


def copy_inputs(seed: int, count: int = 5, length: int = 5):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 31, (1, length), generator=generator) for _ in range(count)]
