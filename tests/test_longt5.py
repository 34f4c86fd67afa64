"""LongT5 (local and transient-global), Flan-T5 and mT5 (issue 16): the early-exit decoder, the
training losses and the task runner against HF's own classes, on tiny in-memory configs.

Oracles: HF's `generate` of the model's own HF class with the same weights (full model), and the
slow cache-free `reference_decode` over HF's own decoder blocks (static and mixed exits).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from transformers import (LongT5Config, LongT5ForConditionalGeneration, MT5Config, MT5ForConditionalGeneration,
                          T5Config, T5ForConditionalGeneration, UMT5Config, UMT5ForConditionalGeneration)

from engine_helpers import (EOS, PAD, assert_training_lowers_every_layers_loss, output_logits, reference_decode,
                            threshold_rule)
from models import modeling_t5 as mt
from models.confidence import softmax_confidence
from models.deploying_longt5 import DeployLongT5ForConditionalGeneration, local_window_keys, longt5_encoder_flops
from models.deploying_mt5 import DeployMT5ForConditionalGeneration, use_mt5_output_scaling
from models.deploying_t5 import DeployT5ForConditionalGeneration
from models.flops import Shape, encoder_flops
from models.modeling_longt5 import TrainLongT5ForConditionalGeneration
from models.modeling_mt5 import TrainMT5ForConditionalGeneration
from tasks import runner
from tasks.adapters import Summarization
from util.additional_args import AdditionalArguments, update_autoconfig
from util.copy_task import copy_batch, train_copy_model
from util.toy_models import train_toy_tokenizer

TINY = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4, dropout_rate=0.0,
            decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS,
            initializer_factor=3.0)  # larger random weights: outputs vary with the input (see _varied)
# a radius and global blocks far shorter than the inputs (23 tokens), so the encoder's local and
# global attention both matter
LONG = dict(local_radius=2, global_block_size=3)

# name -> (config class, its settings, our deploy class, HF's class)
VARIANTS = {
    "longt5-local": (LongT5Config, dict(LONG, encoder_attention_type="local"),
                     DeployLongT5ForConditionalGeneration, LongT5ForConditionalGeneration),
    "longt5-tglobal": (LongT5Config, dict(LONG, encoder_attention_type="transient-global"),
                       DeployLongT5ForConditionalGeneration, LongT5ForConditionalGeneration),
    # the released LongT5 checkpoints: gated-gelu, untied (so no output scaling)
    "longt5-tglobal-gated": (LongT5Config, dict(LONG, encoder_attention_type="transient-global",
                                                feed_forward_proj="gated-gelu", tie_word_embeddings=False),
                             DeployLongT5ForConditionalGeneration, LongT5ForConditionalGeneration),
    "longt5-local-gated": (LongT5Config, dict(LONG, encoder_attention_type="local", feed_forward_proj="gated-gelu",
                                              tie_word_embeddings=False),
                           DeployLongT5ForConditionalGeneration, LongT5ForConditionalGeneration),
    # Flan-T5 is T5 v1.1: gated-gelu, untied head (model_type "t5")
    "flan-t5": (T5Config, dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
                DeployT5ForConditionalGeneration, T5ForConditionalGeneration),
    "mt5": (MT5Config, dict(), DeployMT5ForConditionalGeneration, MT5ForConditionalGeneration),
}


def build(variant, seed=0, **flags):
    """(our deploy model, HF's model of its own class with the same weights)."""
    config_class, settings, deploy_class, hf_class = VARIANTS[variant]
    config = update_autoconfig(config_class(**TINY, **settings), AdditionalArguments(**flags))
    torch.manual_seed(seed)
    model = deploy_class(config).eval()
    reference = hf_class(config).eval()
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("cm_head")})
    return model, reference


def random_inputs(seed, count=4, length=23, vocab=64):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (1, length), generator=generator) for _ in range(count)]


def _varied(outputs):
    """Whether the outputs depend on the input and are not one token repeated: else equality with
    the oracle would prove little."""
    distinct = {tuple(o[0].tolist()) for o in outputs}
    return len(distinct) >= 2 and any(len(set(seq[1:])) > 2 for seq in distinct)


# ----- full model: token-identical to HF's generate -------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_full_model_equals_hf_generate_of_its_own_class(variant):
    model, reference = build(variant)
    outputs = []
    for input_ids in random_inputs(1):
        expected = reference.generate(input_ids=input_ids, max_new_tokens=12, do_sample=False, num_beams=1)
        ours = model.generate(input_ids=input_ids, max_new_tokens=12)
        assert torch.equal(ours, expected)
        outputs.append(ours)
    assert _varied(outputs), [o.tolist() for o in outputs]
    assert model.exit_stats()["block_avg"] == 3.0


def test_mt5_applies_no_output_scaling_like_mt5_itself():
    # T5 v1.0 scales the decoder output by d_model^-0.5 before its head; MT5 never does
    model, reference = build("mt5")
    assert model.config.scale_decoder_outputs is False
    input_ids = random_inputs(2, count=1)[0]
    with torch.no_grad():
        logits = reference(input_ids=input_ids, decoder_input_ids=torch.tensor([[PAD, 5, 7]])).logits
    # the decode loop's head on block L's raw output is MT5's own logits
    assert torch.allclose(output_logits(model, _raw_last_block(model, input_ids)), logits, atol=1e-5)


def _raw_last_block(model, input_ids):
    """Block L's raw output (before the final norm) for decoder inputs [PAD, 5, 7], via a hook."""
    captured = []
    hook = model.decoder.block[-1].register_forward_hook(lambda m, i, o: captured.append(o[0]))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, decoder_input_ids=torch.tensor([[PAD, 5, 7]]))
    finally:
        hook.remove()
    return captured[0]


def test_padded_batch_rows_equal_hf_generate_of_each_row_alone():
    model, reference = build("longt5-tglobal-gated")
    rows = [ids[:, :length] for ids, length in zip(random_inputs(3, count=3), (23, 11, 17))]
    batch = torch.zeros((3, 23), dtype=torch.long)
    mask = torch.zeros((3, 23), dtype=torch.long)
    for b, row in enumerate(rows):
        batch[b, : row.shape[1]], mask[b, : row.shape[1]] = row[0], 1
    out = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=12)
    for b, row in enumerate(rows):
        alone = reference.generate(input_ids=row, max_new_tokens=12, do_sample=False, num_beams=1)
        width = alone.shape[1]
        assert torch.equal(out[b : b + 1, :width], alone)
        assert (out[b, width:] == PAD).all()


# ----- static and mixed exits against the cache-free reference ---------------------------------------
def copy_model(attention):
    """A tiny LongT5 trained on util.copy_task (decoder of 4 blocks, encoder of 2), so that
    intermediate layers are confident on some tokens and not on others."""
    config = LongT5Config(vocab_size=32, d_model=64, d_kv=8, d_ff=128, num_layers=2, num_decoder_layers=4,
                          num_heads=4, dropout_rate=0.0, decoder_start_token_id=PAD, pad_token_id=PAD,
                          eos_token_id=EOS, local_radius=2, global_block_size=2, encoder_attention_type=attention)
    trained = train_copy_model(config, model_class=LongT5ForConditionalGeneration)
    model = DeployLongT5ForConditionalGeneration(update_autoconfig(config, AdditionalArguments())).eval()
    model.load_state_dict(trained.state_dict())
    return model.to(torch.float64)  # far from threshold ties: the loop's shapes differ from the oracle's


@pytest.fixture(scope="module", params=["local", "transient-global"])
def trained_longt5(request):
    return copy_model(request.param)


def copy_inputs(seed, count=5, length=7):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 31, (1, length), generator=generator) for _ in range(count)]


def truncated_twin(model, layers):
    """HF's LongT5 with the model's weights and only the first `layers` decoder blocks."""
    twin = LongT5ForConditionalGeneration(model.config).eval().to(model.dtype)
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("cm_head")})
    twin.decoder.block = twin.decoder.block[:layers]
    return twin


@pytest.mark.parametrize("layer", [1, 2])
def test_static_exit_equals_cache_free_reference(trained_longt5, layer):
    model = trained_longt5
    update_autoconfig(model.config, AdditionalArguments(static_exit_layer=layer))
    never = lambda *_: False  # noqa: E731
    for input_ids in copy_inputs(4, count=3):
        out = model.generate(input_ids=input_ids, max_new_tokens=12)
        tokens, _ = reference_decode(truncated_twin(model, layer), input_ids, 12, never)
        assert out[0].tolist() == tokens
        assert model.exit_stats()["block_avg"] == layer


@pytest.mark.parametrize("conf_type, threshold, min_layer", [("softmax", 0.9, 1), ("softmax", 0.6, 2), ("state", 0.92, 1)])
def test_mixed_exits_equal_cache_free_reference(trained_longt5, conf_type, threshold, min_layer):
    model = trained_longt5
    update_autoconfig(model.config, AdditionalArguments(use_early_exit=True, exit_conf_type=conf_type,
                                                        exit_conf_threshold=threshold, exit_min_layer=min_layer))
    reference = truncated_twin(model, 4)
    rule = threshold_rule(reference, conf_type, threshold, min_layer)
    seen = set()
    for input_ids in copy_inputs(5):
        out = model.generate(input_ids=input_ids, max_new_tokens=12)
        exits = model.exit_stats()["exit_layers"][0]
        tokens, expected_exits = reference_decode(reference, input_ids, 12, rule)
        assert out[0].tolist() == tokens
        assert exits == expected_exits
        seen.update(exits)
    assert len(seen) >= 2, f"exits never varied ({seen}): the test would prove nothing"


def test_shallow_deep_extremes_equal_full_model_and_static_exit(trained_longt5):
    """FREE's parallel decoding on LongT5: a threshold no confidence passes is the full model (HF's
    generate cannot run an encoder shallower than the decoder: the cache-free reference without
    exits); one every confidence passes is a static exit at the shallow layer."""
    model = trained_longt5
    hf = truncated_twin(model, 4)
    for input_ids in copy_inputs(8, count=3):
        update_autoconfig(model.config, AdditionalArguments(use_shallow_deep=True, shallow_exit_layer=2,
                                                            shallow2deep_conf_type="softmax",
                                                            shallow2deep_conf_threshold=1.0))
        full, _ = reference_decode(hf, input_ids, 12, lambda *_: False)
        assert model.generate(input_ids=input_ids, max_new_tokens=12)[0].tolist() == full
        update_autoconfig(model.config, AdditionalArguments(static_exit_layer=2))
        static = model.generate(input_ids=input_ids, max_new_tokens=12)
        update_autoconfig(model.config, AdditionalArguments(use_shallow_deep=True, shallow_exit_layer=2,
                                                            shallow2deep_conf_type="softmax",
                                                            shallow2deep_conf_threshold=0.0))
        assert torch.equal(model.generate(input_ids=input_ids, max_new_tokens=12), static)
        assert model.exit_stats()["exit_layer_counts"][1] == model.exit_stats()["tokens"]


def test_mt5_mixed_exits_equal_cache_free_reference():
    """mT5's unscaled head inside the confidence (a wrong scale changes which tokens exit)."""
    config = MT5Config(vocab_size=32, d_model=64, d_kv=8, d_ff=128, num_layers=2, num_decoder_layers=4,
                       num_heads=4, dropout_rate=0.0, decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS)
    use_mt5_output_scaling(config)  # output_logits reads it during training
    trained = train_copy_model(config, model_class=MT5ForConditionalGeneration)
    flags = AdditionalArguments(use_early_exit=True, exit_conf_type="softmax", exit_conf_threshold=0.9)
    model = DeployMT5ForConditionalGeneration(update_autoconfig(config, flags)).eval()
    model.load_state_dict(trained.state_dict())
    model.to(torch.float64)
    reference = MT5ForConditionalGeneration(model.config).eval().to(torch.float64)
    reference.load_state_dict(model.state_dict())

    def rule(layer, hidden, previous, step):  # MT5's own head, as its forward applies it: no scaling
        return softmax_confidence(reference.lm_head(reference.decoder.final_layer_norm(hidden))).item() > 0.9

    seen = set()
    for input_ids in copy_inputs(6):
        out = model.generate(input_ids=input_ids, max_new_tokens=12)
        exits = model.exit_stats()["exit_layers"][0]
        tokens, expected_exits = reference_decode(reference, input_ids, 12, rule)
        assert (out[0].tolist(), exits) == (tokens, expected_exits)
        seen.update(exits)
    assert len(seen) >= 2, f"exits never varied ({seen})"


# ----- FLOPs of LongT5's encoder ------------------------------------------------------------------------
def test_local_window_keys_by_hand():
    # radius 1 over 5 tokens: windows of 2, 3, 3, 3, 2 keys
    assert local_window_keys(5, 1) == 13
    assert local_window_keys(4, 10) == 16  # a radius beyond the sequence: full attention


def test_longt5_encoder_flops_equal_t5s_when_the_window_covers_everything():
    config = LongT5Config(**TINY, local_radius=50, encoder_attention_type="local")
    assert longt5_encoder_flops(config, 23) == encoder_flops(Shape.of(config), 23)
    tglobal = LongT5Config(**TINY, local_radius=2, global_block_size=3, encoder_attention_type="transient-global")
    d, inner, S, G, L = 32, 32, 23, 8, 3  # 8 global tokens for 23 positions in blocks of 3
    keys = local_window_keys(S, 2) + S * G
    by_hand = L * (2 * d * inner * 4 * S + 2 * 2 * d * inner * G + 4 * inner * keys + 2 * d * 64 * 2 * S)
    assert longt5_encoder_flops(tglobal, S) == by_hand


def test_count_flops_reports_longt5s_encoder_per_unpadded_row():
    model, _ = build("longt5-tglobal", count_flops=True)
    batch = torch.cat(random_inputs(7, count=2), dim=0)
    mask = torch.ones_like(batch)
    mask[1, 15:] = 0
    model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=5)
    stats = model.exit_stats()
    assert stats["flops_encoder"] == longt5_encoder_flops(model.config, 23) + longt5_encoder_flops(model.config, 15)
    assert stats["flops_total"] == stats["flops_encoder"] + stats["flops_blocks"] + stats["flops_confidence"]


# ----- training: the losses, meta head and LoRA over LongT5 and mT5 -------------------------------------
TRAIN_VARIANTS = {
    "longt5": (LongT5Config, dict(encoder_attention_type="transient-global", local_radius=2, global_block_size=2),
               TrainLongT5ForConditionalGeneration),
    "mt5": (MT5Config, dict(), TrainMT5ForConditionalGeneration),
}


def train_model(variant, seed=0, **flags):
    config_class, settings, train_class = TRAIN_VARIANTS[variant]
    config = config_class(vocab_size=32, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3,
                          num_heads=4, dropout_rate=0.0, decoder_start_token_id=PAD, pad_token_id=PAD,
                          eos_token_id=EOS, **settings)
    torch.manual_seed(seed)
    return train_class(update_autoconfig(config, AdditionalArguments(**flags)))


def train_batch(seed=0, size=8):
    source, labels = copy_batch(torch.Generator().manual_seed(seed), size, 6, 32)
    labels[0, -2:] = -100
    return {"input_ids": source, "labels": labels}


def block_logits(model, inputs):
    """Every decoder block's head through hooks on the blocks (independent of hidden_states)."""
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o[0])) for b in model.decoder.block]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return [output_logits(model, h) for h in outputs[-len(model.decoder.block):]]


@pytest.mark.parametrize("variant", TRAIN_VARIANTS)
def test_intermediate_losses_use_every_block_through_the_decode_head(variant):
    inputs = train_batch()
    model = train_model(variant, output_hidden_states_decoder=True, intermediate_loss_fn="weighted_ce").eval()
    logits = block_logits(model, inputs)
    # the last block's head is the model's own logits (its output scaling included)
    assert torch.allclose(logits[-1], model(input_ids=inputs["input_ids"], labels=inputs["labels"]).logits, atol=1e-5)
    assert float(model(**inputs).loss) == pytest.approx(float(mt.weighted_ce_loss(logits, inputs["labels"])), rel=1e-5)

    kd = train_model(variant, output_hidden_states_decoder=True, intermediate_loss_fn="shallowdeep_kl_dyna",
                     shallow_exit_layer=1, distill_layer_alpha=0.25).eval()
    logits = block_logits(kd, inputs)
    ce = mt.shallow_deep_ce(logits[0], logits[2], inputs["labels"], 1, 3)
    distilled = mt.kl_distillation("shallowdeep_kl_dyna", logits[0], logits[1:], inputs["labels"])
    assert float(kd(**inputs).loss) == pytest.approx(float(0.75 * ce + 0.25 * distilled), rel=1e-5)


def test_a_few_steps_lower_every_longt5_layers_loss():
    model = train_model("longt5", seed=1, output_hidden_states_decoder=True, intermediate_loss_fn="ce")
    assert_training_lowers_every_layers_loss(model, lambda seed: train_batch(seed=seed, size=16), steps=20)


def test_longt5_meta_head_trains_alone_and_reloads_into_the_deploy_class(tmp_path):
    model = mt.prepare_for_training(train_model("longt5", seed=2, output_hidden_states_decoder=True,
                                                train_meta_cm_head=True))
    assert all(n.startswith("cm_head.") for n, p in model.named_parameters() if p.requires_grad)
    inputs = train_batch(size=16)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = float(model(**inputs).loss)
    for _ in range(10):
        loss = model(**inputs).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert float(model(**inputs).loss) < first
    path = str(tmp_path / "checkpoint")
    mt.save_checkpoint(model, None, path)
    reloaded = DeployLongT5ForConditionalGeneration.from_pretrained(path).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


@pytest.mark.parametrize("variant", TRAIN_VARIANTS)
def test_lora_trains_only_adapters_and_merges(variant):
    model = mt.prepare_for_training(train_model(variant, use_lora=True, lora_rank=4, lora_alpha=8, lora_dropout=0.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("decoder" in n and ".q.lora_A" in n for n in trainable)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    model.eval()
    inputs = train_batch()
    unmerged = model(**inputs).logits
    merged = mt.merged_for_saving(model)
    assert type(merged) is TRAIN_VARIANTS[variant][2]
    assert torch.allclose(merged(**inputs).logits, unmerged, rtol=1e-5, atol=1e-4)  # mT5 logits are unscaled
    assert (unmerged - train_model(variant)(**inputs).logits).abs().max() > 1e-3


# ----- the task runner ------------------------------------------------------------------------------------
ROWS = [{"id": f"r{i}", "text": f"document number {i} about cats and dogs and birds {i}.", "summary": f"cats {i}."}
        for i in range(3)]


def test_model_class_follows_the_model_type():
    assert runner.model_class(training=False, deploy=True, model_type="longt5") is DeployLongT5ForConditionalGeneration
    assert runner.model_class(training=True, deploy=False, model_type="longt5") is TrainLongT5ForConditionalGeneration
    assert runner.model_class(training=False, deploy=False, model_type="longt5") is LongT5ForConditionalGeneration
    assert runner.model_class(training=False, deploy=True, model_type="mt5") is DeployMT5ForConditionalGeneration
    assert runner.model_class(training=True, deploy=False, model_type="mt5") is TrainMT5ForConditionalGeneration
    assert runner.model_class(training=False, deploy=True, model_type="t5") is DeployT5ForConditionalGeneration
    with pytest.raises(ValueError, match="'umt5'.*own relative position bias.*longt5, mt5, t5"):
        runner.model_class(training=False, deploy=True, model_type="umt5")


def save_model(folder, config_class, settings, model_class=None, seed=0):
    tokenizer = train_toy_tokenizer([r["text"] + " " + r["summary"] + " summarize:" for r in ROWS], vocab_size=80)
    config = config_class(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                          dropout_rate=0.0, decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS,
                          initializer_factor=3.0, **settings)
    torch.manual_seed(seed)
    model_class(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


def data_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return str(path)


def summarize(model, data, out, *extra):
    return runner.run(Summarization(), [
        "--model_name_or_path", model, "--validation_file", data, "--do_eval", "--output_dir", str(out),
        "--text_column", "text", "--summary_column", "summary", "--max_source_length", "64",
        "--max_target_length", "8", "--disable_tqdm", "True", *extra])


def predictions(out, prefix="eval"):
    with open(os.path.join(out, f"{prefix}_predictions.jsonl")) as handle:
        return [json.loads(line)["prediction"] for line in handle]


@pytest.mark.parametrize("kind", ["longt5-tglobal", "longt5-local", "mt5"])
def test_runner_decodes_each_model_type_from_a_local_folder_as_hf_does(tmp_path, kind):
    config_class, settings, _, hf_class = VARIANTS[kind]
    folder = str(tmp_path / "model")
    tokenizer = save_model(folder, config_class, settings, hf_class, seed=1)  # a seed whose outputs vary
    data = data_file(tmp_path)
    summarize(folder, data, tmp_path / "deploy", "--deploy_scenario", "True")
    summarize(folder, data, tmp_path / "batched", "--per_device_eval_batch_size", "2")
    # the oracle: HF's own class loaded from the folder, through the runner's tokenisation
    reference = hf_class.from_pretrained(folder).eval()
    task, data_args = Summarization(), runner.parse_arguments(
        ["--model_name_or_path", folder, "--validation_file", data, "--output_dir", str(tmp_path / "x"),
         "--text_column", "text", "--summary_column", "summary"])[1]
    task.resolve_arguments(data_args)
    sources = [task.source_text(r, data_args) for r in ROWS]
    expected, _, _ = runner.generate_predictions(reference, tokenizer, sources, 64, max_new_tokens=8, num_beams=1,
                                                 batch_size=1, show_progress=False)
    assert predictions(tmp_path / "deploy") == expected
    assert predictions(tmp_path / "batched") == expected
    assert len(set(expected)) >= 2, expected  # the outputs depend on the input


def test_runner_trains_longt5_with_intermediate_losses(tmp_path):
    folder = str(tmp_path / "model")
    save_model(folder, LongT5Config, dict(LONG, encoder_attention_type="transient-global"),
               LongT5ForConditionalGeneration)
    data = data_file(tmp_path)
    out = tmp_path / "run"
    results = summarize(folder, data, out, "--train_file", data, "--do_train", "--max_steps", "2",
                        "--per_device_train_batch_size", "3", "--save_strategy", "no",
                        "--output_hidden_states_decoder", "True", "--intermediate_loss_fn", "weighted_ce")
    assert "train_loss" in results and "eval_rougeL" in results
    with open(out / "config.json") as handle:
        saved = json.load(handle)
    assert saved["model_type"] == "longt5" and saved["intermediate_loss_fn"] == "weighted_ce"


@pytest.mark.parametrize("config_class, model_class, message", [
    (UMT5Config, UMT5ForConditionalGeneration, "'umt5' model.*own relative position bias"),
])
def test_runner_refuses_unsupported_model_types_before_loading(tmp_path, monkeypatch, config_class, model_class,
                                                               message):
    def refuse(**_):
        raise AssertionError("the model was loaded before the model type was refused")

    folder = str(tmp_path / "model")
    save_model(folder, config_class, dict(), model_class)
    monkeypatch.setattr(runner, "model_class", refuse)
    with pytest.raises(ValueError, match=f"--model_name_or_path .*{message}.*Supported model types: longt5, mt5, t5"):
        summarize(folder, data_file(tmp_path), tmp_path / "out", "--deploy_scenario", "True")
    assert not os.path.exists(tmp_path / "out")


# ----- the long-document scripts ------------------------------------------------------------------------
@pytest.mark.parametrize("script, data", [("run_sum_multinews.sh", "--dataset_name multi_news"),
                                          ("run_sum_bigpatent.sh", "--dataset_name big_patent --dataset_config_name e")])
def test_long_document_scripts_default_to_longt5_with_frees_settings(script, data, tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # PYTHON is a stub: it runs the method table for real and prints each stage's command line
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/bash\nif [ "$1" = src/util/methods.py ]; then exec {sys.executable} "$@"; fi\necho "$@"\n')
    stub.chmod(0o755)
    env = dict(os.environ, PYTHON=str(stub), METHOD="static")
    env.pop("MODEL", None)
    done = subprocess.run(["bash", os.path.join(root, "scripts", script)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    train, evaluate = done.stdout.strip().splitlines()
    assert train.startswith("src/run_summarization.py --model_name_or_path google/long-t5-tglobal-base " + data)
    for stage in (train, evaluate):
        assert "--max_source_length 2048 --max_target_length 512" in stage
    assert "--learning_rate 1e-4 --num_train_epochs 3" in train and "--per_device_train_batch_size 2" in train
    assert "--static_exit_layer 6" in evaluate and "--deploy_scenario True" in evaluate
