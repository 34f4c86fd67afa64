"""Every invalid flag or combination fails before any work, naming the flag."""

import pytest

from engine_helpers import tiny_config
from tasks.arguments import parse_arguments
from util.additional_args import AdditionalArguments, update_autoconfig

L = 6


def configure(**flags):
    return update_autoconfig(tiny_config(num_decoder_layers=L), AdditionalArguments(**flags))


def test_defaults_match_free():
    args = AdditionalArguments()
    assert (args.exit_conf_threshold, args.shallow2deep_conf_threshold) == (1.0, 1.0)
    assert args.parallel_gen_token and args.parallel_causal_mask and args.use_synchronize
    assert (args.lora_rank, args.lora_alpha, args.lora_dropout) == (8, 8, 0.1)
    assert (args.vocab_k_max, args.vocab_k_min, args.vocab_adaptive_scale, args.cd_alpha) == (35000, 250, 0.9, 0.1)


def test_flags_and_kwargs_are_copied_into_the_config():
    config = update_autoconfig(tiny_config(num_decoder_layers=L),
                               AdditionalArguments(use_early_exit=True, exit_conf_type="softmax",
                                                   exit_conf_threshold=0.8, exit_min_layer=2),
                               max_answer_length=30)
    assert (config.use_early_exit, config.exit_conf_type, config.exit_conf_threshold) == (True, "softmax", 0.8)
    assert config.exit_min_layer == 2 and config.max_answer_length == 30
    assert AdditionalArguments.from_config(config).exit_min_layer == 2


def test_the_forks_final_flops_flag_switches_flop_counting_on():
    assert AdditionalArguments(final_flops=True).count_flops is True
    assert AdditionalArguments().count_flops is False
    config = configure(use_early_exit=True, exit_conf_type="softmax", final_flops=True)
    assert AdditionalArguments.from_config(config).count_flops is True
    *_, parsed = parse_arguments(["--model_name_or_path", "t5-small", "--output_dir", "unused", "--final_flops", "True"])
    assert parsed.count_flops is True


@pytest.mark.parametrize(
    "flags, names",
    [
        (dict(use_early_exit=True, exit_conf_type="entropy"), ["exit_conf_type", "softmax"]),
        (dict(use_early_exit=True), ["exit_conf_type"]),
        (dict(type_vocab_reduct="shrinking", use_early_exit=True, exit_conf_type="softmax"), ["type_vocab_reduct", "fixed"]),
        (dict(type_vocab_reduct="fixed"), ["type_vocab_reduct", "use_early_exit"]),
        (dict(static_exit_layer=0), ["static_exit_layer", "1..6"]),
        (dict(static_exit_layer=7), ["static_exit_layer"]),
        (dict(use_early_exit=True, exit_conf_type="softmax", exit_min_layer=6), ["exit_min_layer", "1..5"]),
        (dict(use_early_exit=True, exit_conf_type="softmax", exit_conf_threshold=1.5), ["exit_conf_threshold"]),
        (dict(use_early_exit=True, exit_conf_type="softmax", exit_conf_threshold=-0.1), ["exit_conf_threshold"]),
        (dict(use_early_exit=True, exit_conf_type="softmax", exit_position_temp=-1.0), ["exit_position_temp"]),
        (dict(exit_min_layer=2), ["exit_min_layer", "use_early_exit"]),
        (dict(use_early_exit=True, exit_conf_type="softmax", use_shallow_deep=True, shallow_exit_layer=2,
              shallow2deep_conf_type="softmax"), ["use_early_exit", "use_shallow_deep"]),
        (dict(static_exit_layer=2, use_early_exit=True, exit_conf_type="softmax"), ["static_exit_layer"]),
        (dict(use_shallow_deep=True), ["shallow_exit_layer"]),
        (dict(use_shallow_deep=True, shallow_exit_layer=6, shallow2deep_conf_type="softmax"), ["shallow_exit_layer"]),
        (dict(intermediate_loss_fn="ce"), ["intermediate_loss_fn", "output_hidden_states_decoder"]),
        (dict(intermediate_loss_fn="mse", output_hidden_states_decoder=True), ["intermediate_loss_fn", "weighted_ce"]),
        (dict(train_meta_cm_head=True), ["train_meta_cm_head", "output_hidden_states_decoder"]),
        (dict(parallel_causal_mask=False, copy_skipped_hidden_states=True), ["parallel_causal_mask", "copy_skipped_hidden_states"]),
        (dict(rollback_conf_threshold=1.0, copy_skipped_hidden_states=True), ["rollback_conf_threshold"]),
        (dict(vocab_k_min=0), ["vocab_k_min", "positive"]),
        (dict(vocab_k_min=500, vocab_k_max=400), ["vocab_k_min", "vocab_k_max"]),
        (dict(vocab_adaptive_scale=0.0), ["vocab_adaptive_scale"]),
        (dict(cd_alpha=1.5), ["cd_alpha"]),
        (dict(lora_dropout=1.0), ["lora_dropout"]),
        (dict(lora_rank=0), ["lora_rank"]),
        # flags that would be silently ignored (issue 13, item 6)
        (dict(exit_conf_type="softmax"), ["exit_conf_type", "use_early_exit"]),
        (dict(use_shallow_deep=True, shallow_exit_layer=2, shallow2deep_conf_type="softmax", exit_conf_type="softmax"),
         ["exit_conf_type", "use_early_exit"]),
        (dict(use_shallow_deep=True, shallow_exit_layer=2, shallow2deep_conf_type="softmax", type_vocab_reduct="fixed"),
         ["type_vocab_reduct", "use_shallow_deep"]),
        (dict(use_early_exit=True, exit_conf_type="softmax", shallow2deep_conf_type="contrastive_decoding",
              emit_contrastive_token=True), ["emit_contrastive_token", "'softmax'"]),
        (dict(shallow2deep_conf_type="reweight_contrastive_decoding", emit_contrastive_token=True),
         ["emit_contrastive_token", "None"]),
        (dict(use_early_exit=True, exit_conf_type="softmax", exit_min_layer=3,
              shallow2deep_conf_type="JSD_contrastive_confidence", render_jsds=True), ["render_jsds", "'softmax'"]),
        (dict(use_early_exit=True, exit_conf_type="contrastive_decoding", exit_min_layer=3, render_jsds=True),
         ["render_jsds", "'contrastive_decoding'"]),
    ],
)
def test_invalid_flags_raise_a_clear_error(flags, names):
    with pytest.raises(ValueError) as error:
        configure(**flags)
    for name in names:
        assert name in str(error.value)


@pytest.mark.parametrize("flags", [
    dict(use_shallow_deep=True, shallow_exit_layer=3, shallow2deep_conf_type="JSD_contrastive_confidence",
         render_jsds=True, emit_contrastive_token=True),
    dict(use_early_exit=True, exit_conf_type="reweight_contrastive_decoding", exit_min_layer=2, emit_contrastive_token=True),
    dict(use_early_exit=True, exit_conf_type="softmax", type_vocab_reduct="fixed"),
])
def test_flags_that_act_are_accepted(flags):
    configure(**flags)


def test_a_meta_exit_without_its_head_fails_before_decoding():
    import torch
    from models.deploying_t5 import DeployT5ForConditionalGeneration

    model = DeployT5ForConditionalGeneration(tiny_config()).eval()
    model.config.use_early_exit, model.config.exit_conf_type = True, "meta"
    with pytest.raises(ValueError, match="meta head"):
        model.generate(input_ids=torch.tensor([[3, 4]]), max_new_tokens=3)


@pytest.mark.parametrize("kwargs, message", [(dict(num_beams=2), "beam search is not supported"),
                                             (dict(do_sample="yes"), "do_sample"),
                                             (dict(temperature=0.5), "temperature"),
                                             (dict(max_new_tokens=0), "max_new_tokens")])
def test_generate_rejects_what_it_does_not_do(kwargs, message):
    import torch
    from models.deploying_t5 import DeployT5ForConditionalGeneration

    model = DeployT5ForConditionalGeneration(tiny_config()).eval()
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids=torch.tensor([[3, 4]]), **kwargs)


@pytest.mark.parametrize("flags, message", [
    (dict(use_shallow_deep=True, shallow_exit_layer=2, shallow2deep_conf_type="softmax", use_adapt_threshold=True,
          plotting_logits=True), "use_adapt_threshold cannot be combined with plotting_logits"),
    (dict(use_early_exit=True, exit_conf_type="meta", type_vocab_reduct="fixed", vocab_rerank=True),
     "vocab_rerank re-orders"),
    (dict(use_early_exit=True, exit_conf_type="state", type_vocab_reduct="adaptive", vocab_rerank=True),
     "'state' measure never computes"),
])
def test_combinations_the_batched_loop_cannot_honour_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        update_autoconfig(tiny_config(num_layers=4), AdditionalArguments(**flags))
