"""Training early exits on decoder-only models, and LayerSkip's recipe (also on T5's decoder):
every loss against a slow float64 re-derivation from each block's raw output, taken through
hooks on the blocks (not HF's hidden_states, which the models read)."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

from models import exit_training as et
from models.modeling_causal import TRAIN_CLASSES
from models.modeling_t5 import TrainT5ForConditionalGeneration
from util.additional_args import AdditionalArguments, update_autoconfig, validate_additional_args
from util.copy_task import copy_batch, copy_config

V = 40  # vocabulary
LLAMA_LIKE = dict(vocab_size=V, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=8, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# family -> (config, HF's class); Gemma's soft-capping is set so that the head's cap is exercised
FAMILIES = {
    "llama": (lambda L: LlamaConfig(num_hidden_layers=L, **LLAMA_LIKE), LlamaForCausalLM),
    "mistral": (lambda L: MistralConfig(num_hidden_layers=L, **LLAMA_LIKE), MistralForCausalLM),
    "qwen2": (lambda L: Qwen2Config(num_hidden_layers=L, **LLAMA_LIKE), Qwen2ForCausalLM),
    "qwen3": (lambda L: Qwen3Config(num_hidden_layers=L, **LLAMA_LIKE), Qwen3ForCausalLM),
    "gemma3_text": (lambda L: Gemma3TextConfig(num_hidden_layers=L, final_logit_softcapping=3.0, **LLAMA_LIKE),
                    Gemma3ForCausalLM),
    "gpt2": (lambda L: GPT2Config(vocab_size=V, n_embd=16, n_layer=L, n_head=2, n_positions=32, bos_token_id=1,
                                  eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), GPT2LMHeadModel),
}


def causal_model(family="llama", layers=4, seed=0, **flags):
    config = update_autoconfig(FAMILIES[family][0](layers), AdditionalArguments(**flags))
    torch.manual_seed(seed)
    return TRAIN_CLASSES[family](config)


def causal_batch(seed=0, size=3, length=6):
    ids = torch.randint(3, V, (size, length), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[0, :2] = -100  # a masked prompt
    labels[1, -1] = -100  # padding
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


# ----- the slow re-derivation --------------------------------------------------------------------
def blocks_of(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def raw_blocks(model, inputs):
    """h_1..h_L: each block's output through hooks on the blocks, in a plain forward pass."""
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o[0] if isinstance(o, tuple) else o))
             for b in blocks_of(model)]
    try:
        with torch.no_grad():
            model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    finally:
        for hook in hooks:
            hook.remove()
    return [None] + outputs


def slow_norm(model, h):
    return (model.transformer.ln_f if hasattr(model, "transformer") else model.model.norm)(h)


def slow_head(model, h):
    z = model.lm_head(slow_norm(model, h))
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(z / cap) * cap if cap else z


def valid_tokens(labels):
    """(row, position, target): position t is scored against labels[t + 1], written out."""
    return [(b, t, int(labels[b, t + 1])) for b in range(labels.shape[0]) for t in range(labels.shape[1] - 1)
            if int(labels[b, t + 1]) != -100]


def log_softmax(z):
    top = max(z)
    log_sum = top + math.log(sum(math.exp(v - top) for v in z))
    return [v - log_sum for v in z]


def slow_ce(logits, labels):
    tokens = valid_tokens(labels)
    return sum(-log_softmax(logits[b, t].tolist())[y] for b, t, y in tokens) / len(tokens)


def slow_kl(teacher, student, b, t):
    p, q = log_softmax(teacher[b, t].tolist()), log_softmax(student[b, t].tolist())
    return sum(math.exp(a) * (a - c) for a, c in zip(p, q))


def slow_mse(a, b):
    d = (a - b).flatten().tolist()
    return sum(x * x for x in d) / len(d)


def slow_loss(model, inputs, name, k=2, alpha=0.4, layers=None, scale=1.0):
    """Every loss from its formula (models.exit_training's docstring), in float64 Python arithmetic."""
    labels = inputs["labels"]
    h = raw_blocks(model, inputs)
    L = len(h) - 1
    z = [None] + [slow_head(model, h[l]) for l in range(1, L + 1)]
    ce = [None] + [slow_ce(z[l], labels) for l in range(1, L + 1)]
    if name == "ce":
        return sum(ce[1:]) / L
    if name == "weighted_ce":
        return sum(l * ce[l] for l in range(1, L + 1)) / sum(range(1, L + 1))
    if name == "layerskip":  # sum_l scale: c_l = e l (l + 1) / 2, c_L = L (L + 1) / 2, normalised
        c = {l: l * (l + 1) / 2 * (scale if l < L else 1.0) for l in layers}
        return sum(c[l] * ce[l] for l in layers) / sum(c.values())
    ce_sd = (k * ce[k] + L * ce[L]) / (k + L)
    if name == "shallowdeep_ce":
        return ce_sd
    transform = getattr(model, "layer_transformation", None)
    n = [None] + [slow_norm(model, h[l]) for l in range(1, L + 1)]
    if name.startswith("shallowdeep_kd"):
        student = [None] + [n[j] @ transform.weight.T if transform is not None else n[j] for j in range(1, k + 1)]
        if name == "shallowdeep_kd_last":
            return ce_sd + alpha * slow_mse(n[L], student[k])
        teacher = [math.ceil(j * L / k) for j in range(1, k + 1)]
        mse = [[slow_mse(n[teacher[a]], student[j + 1]) for j in range(k)] for a in range(k)]
        if name == "shallowdeep_kd_unif":
            return ce_sd + alpha * sum(mse[a][a] for a in range(k)) / k
        chosen, below = {}, k
        for a in reversed(range(k)):
            chosen[a] = min(range(below), key=lambda j: mse[a][j]) if below else chosen[a + 1]
            below = chosen[a]
        return ce_sd + alpha * sum(mse[a][chosen[a]] for a in range(k)) / k
    student = slow_head(model, h[k] @ transform.weight.T) if transform is not None else z[k]
    tokens = valid_tokens(labels)
    if name == "shallowdeep_kl_last":
        kd = [slow_kl(z[L], student, b, t) for b, t, _ in tokens]
    elif name == "shallowdeep_kl_dyna":
        kd = [min(slow_kl(z[j], student, b, t) for j in range(k + 1, L + 1)) for b, t, _ in tokens]
    else:  # _unif: the model's generator, seeded 0, draws one teacher in k+1..L per position read
        columns = sorted({t for _, t, _ in tokens})  # the losses read the positions some row has a label at
        draws = torch.randint(L - k, (labels.shape[0], len(columns)), generator=torch.Generator().manual_seed(0))
        kd = [slow_kl(z[k + 1 + int(draws[b, columns.index(t)])], student, b, t) for b, t, _ in tokens]
    return (1 - alpha) * ce_sd + alpha * sum(kd) / len(kd)


LOSSES = ["ce", "weighted_ce", "shallowdeep_ce", "shallowdeep_kd_last", "shallowdeep_kd_unif", "shallowdeep_kd_dyna",
          "shallowdeep_kl_last", "shallowdeep_kl_unif", "shallowdeep_kl_dyna", "layerskip"]


def loss_flags(name, transform=False):
    flags = dict(output_hidden_states_decoder=True, intermediate_loss_fn=name)
    if name.startswith("shallowdeep"):
        flags["shallow_exit_layer"] = 2
    if name.startswith(("shallowdeep_kd", "shallowdeep_kl")):
        flags.update(distill_layer_alpha=0.4, do_layer_transformation=transform)
    return flags


# ----- HF's hidden states, the head, the label shift --------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hidden_states_are_raw_block_outputs_and_the_last_is_normed(family):
    model = causal_model(family, layers=3).eval()
    inputs = causal_batch()
    h = raw_blocks(model, inputs)
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], output_hidden_states=True)
    assert torch.equal(out.hidden_states[1], h[1]) and torch.equal(out.hidden_states[2], h[2])
    assert torch.allclose(out.hidden_states[3], slow_norm(model, h[3]), atol=1e-6)
    assert not torch.allclose(out.hidden_states[3], h[3], atol=1e-3)
    assert torch.allclose(model._exit_logits(h[3]), out.logits, atol=1e-5)  # z(h_L) is the model's own head


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_last_layer_cross_entropy_is_hfs_own_loss(family):
    """CE_L uses HF's shift: `ce` on a 1-layer model is exactly the plain model's loss."""
    model = causal_model(family, layers=1, output_hidden_states_decoder=True, intermediate_loss_fn="ce").eval()
    plain = FAMILIES[family][1](model.config).eval()
    plain.load_state_dict(model.state_dict())
    inputs = causal_batch()
    assert float(model(**inputs).loss) == pytest.approx(float(plain(**inputs).loss), rel=1e-6)


# ----- every loss against the slow re-derivation ---------------------------------------------------
@pytest.mark.parametrize("name", LOSSES)
def test_each_loss_equals_its_slow_rederivation_on_llama(name):
    model = causal_model("llama", **loss_flags(name)).double().eval()
    inputs = causal_batch()
    expected = slow_loss(model, inputs, name, layers=[1, 2, 3, 4])
    assert float(model(**inputs).loss) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("name", ["weighted_ce", "layerskip", "shallowdeep_kl_dyna"])
def test_heads_run_only_at_positions_with_a_label(name):
    model = causal_model("llama", **loss_flags(name)).double().eval()
    inputs = causal_batch(length=8)
    inputs["labels"][:, :4] = -100  # a 4-token prompt in every row: positions 0..2 predict no label
    widths = []
    hook = model.lm_head.register_forward_hook(lambda module, args, output: widths.append(args[0].shape[1]))
    loss = float(model(**inputs).loss)
    hook.remove()
    assert loss == pytest.approx(slow_loss(model, inputs, name, layers=[1, 2, 3, 4]), rel=1e-9)
    # HF's own head runs once over all 8 positions; every other head over positions 3..6 only
    assert sorted(widths) == [4] * (len(widths) - 1) + [8] and len(widths) > 2


@pytest.mark.parametrize("name", ["shallowdeep_kd_dyna", "shallowdeep_kl_last"])
def test_layer_transformation_enters_the_distillation_as_stated(name):
    model = causal_model("qwen3", **loss_flags(name, transform=True)).double().eval()
    with torch.no_grad():  # not the identity, so that applying it matters
        model.layer_transformation.weight.add_(0.3 * torch.randn(16, 16, dtype=torch.float64))
    inputs = causal_batch()
    assert float(model(**inputs).loss) == pytest.approx(slow_loss(model, inputs, name), rel=1e-9)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("name", ["weighted_ce", "shallowdeep_kl_dyna"])
def test_losses_on_every_family(family, name):
    model = causal_model(family, **loss_flags(name)).double().eval()
    inputs = causal_batch(seed=1)
    assert float(model(**inputs).loss) == pytest.approx(slow_loss(model, inputs, name), rel=1e-9)


def test_meta_head_loss_on_shifted_labels_and_only_the_head_learns():
    model = causal_model("mistral", output_hidden_states_decoder=True, train_meta_cm_head=True, seed=3)
    model = et.prepare_for_training(model)
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"cm_head"}
    inputs = causal_batch()
    h = raw_blocks(model.eval(), inputs)
    logits = [slow_head(model, h[l]) for l in range(1, 5)]
    scores, agree = [], []
    for b, t, _ in valid_tokens(inputs["labels"]):
        final = int(logits[-1][b, t].argmax())
        for l in range(1, 4):
            scores.append(model.cm_head(slow_norm(model, h[l])[b, t]))
            agree.append(int(int(logits[l - 1][b, t].argmax()) == final))
    expected = et.balanced_cross_entropy(torch.stack(scores), torch.tensor(agree))
    model.train()  # the backbone still runs without dropout
    loss = model(**inputs).loss
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("cm_head."))


# ----- LayerSkip: scales and curriculum by hand ------------------------------------------------------
def test_layerskip_weights_by_hand():
    # L = 4, e = 0.5, sum_l: c = 0.5 * (1, 3, 6), then 10 for the last; sum 15
    assert et.layerskip_weights([1, 2, 3, 4], 4, 0.5, "sum_l") == pytest.approx([1 / 30, 1 / 10, 1 / 5, 2 / 3])
    # only layers 2 and 4 enabled: c = 0.5 * 3, 10
    assert et.layerskip_weights([2, 4], 4, 0.5, "sum_l") == pytest.approx([1.5 / 11.5, 10 / 11.5])
    assert et.layerskip_weights([1, 3], 3, 2.0, "uniform") == pytest.approx([2 / 3, 1 / 3])
    assert et.layerskip_weights([1, 2, 4], 4, 1.0, "l") == pytest.approx([1 / 7, 2 / 7, 4 / 7])
    assert et.layerskip_weights([1, 4], 4, 1.0, "inv_l") == pytest.approx([0.8, 0.2])
    assert et.layerskip_weights([1, 4], 4, 1.0, "sqrt_l") == pytest.approx([1 / 3, 2 / 3])
    assert et.layerskip_weights([1, 4], 4, 1.0, "inv_sqrt_l") == pytest.approx([2 / 3, 1 / 3])


def test_curricula_by_hand():
    assert et.curriculum_layers("none", 4) == [1, 2, 3, 4]
    # rotational, R = 2: layers 1 and 3 at t = 0, then shifted by one per step (4 always)
    assert [et.curriculum_layers("rotational", 4, t, rotation=2) for t in range(4)] == \
        [[1, 3, 4], [2, 4], [1, 3, 4], [2, 4]]
    # R = 3 over 5 layers: t = 0 -> 1, 4; t = 1 -> 2, 5; t = 2 -> 3, (5 + 1 - 1) % 5 = 0 -> 1
    assert [et.curriculum_layers("rotational", 5, t, rotation=3) for t in range(3)] == [[1, 4, 5], [2, 5], [1, 3, 5]]
    # gradual, T = 8, L = 4: l joins when t / 8 >= (5 - l) / 8, i.e. at t = 5 - l; all at T / 2
    assert [et.curriculum_layers("gradual", 4, t, 8) for t in range(6)] == \
        [[4], [4], [3, 4], [2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]]


def test_layerskip_model_loss_follows_the_curriculum_step_by_step():
    model = causal_model("llama", output_hidden_states_decoder=True, intermediate_loss_fn="layerskip",
                         early_exit_curriculum="gradual", early_exit_loss_scale=0.5).double()
    callback, inputs = et.CurriculumCallback(), causal_batch()
    model.train()  # llama has no dropout: train mode is deterministic
    for step, layers in [(0, [4]), (2, [3, 4]), (3, [2, 3, 4]), (4, [1, 2, 3, 4])]:
        callback.on_step_begin(None, SimpleNamespace(global_step=step, max_steps=8), None, model=model)
        expected = slow_loss(model, inputs, "layerskip", layers=layers, scale=0.5)
        assert float(model(**inputs).loss) == pytest.approx(expected, rel=1e-9)
    model.eval()  # evaluation: every layer
    expected = slow_loss(model, inputs, "layerskip", layers=[1, 2, 3, 4], scale=0.5)
    assert float(model(**inputs).loss) == pytest.approx(expected, rel=1e-9)


def test_a_curriculum_without_the_training_step_is_an_error():
    model = causal_model("llama", output_hidden_states_decoder=True, intermediate_loss_fn="layerskip",
                         early_exit_curriculum="rotational", early_exit_rotation_interval=2).train()
    with pytest.raises(ValueError, match="early_exit_curriculum='rotational' needs the training step"):
        model(**causal_batch())


def test_layerskip_on_t5s_decoder():
    """T5's decoder, rotational curriculum (R = 2) at step 1: layers 2 and 4, weighted 2 : 4 (scale type l)."""
    config = update_autoconfig(copy_config(dropout_rate=0.0), AdditionalArguments(
        output_hidden_states_decoder=True, intermediate_loss_fn="layerskip", early_exit_scale_type="l",
        early_exit_curriculum="rotational", early_exit_rotation_interval=2))
    torch.manual_seed(0)
    model = TrainT5ForConditionalGeneration(config).double().train()  # no dropout: deterministic
    model.set_training_progress(1, None)
    source, labels = copy_batch(torch.Generator().manual_seed(0), 4, 6, 32)
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o[0])) for b in model.decoder.block]
    loss = float(model(input_ids=source, labels=labels).loss)
    for hook in hooks:
        hook.remove()
    ce = [slow_t5_ce(model, h, labels) for h in outputs]
    assert loss == pytest.approx((2 * ce[1] + 4 * ce[3]) / 6, rel=1e-9)


def slow_t5_ce(model, h, labels):
    """T5's head written out: final norm, output scaling d^-1/2 (tied embeddings), LM head; no shift."""
    z = model.lm_head(model.decoder.final_layer_norm(h) * model.config.d_model ** -0.5)
    tokens = [(b, t, int(labels[b, t])) for b in range(labels.shape[0]) for t in range(labels.shape[1])
              if int(labels[b, t]) != -100]
    return sum(-log_softmax(z[b, t].tolist())[y] for b, t, y in tokens) / len(tokens)


# ----- layer dropout ----------------------------------------------------------------------------------
def test_layer_dropout_rates_by_hand():
    assert et.layer_dropout_rates(4, 0.3) == pytest.approx([0.0, 0.3 * (2 ** (1 / 3) - 1), 0.3 * (2 ** (2 / 3) - 1), 0.3])
    assert et.layer_dropout_rates(3, 0.2, "linear") == pytest.approx([0.0, 0.1, 0.2])
    assert et.layer_dropout_rates(3, 0.2, "uniform") == pytest.approx([0.2, 0.2, 0.2])
    assert et.layer_dropout_rates(1, 0.2) == [0.2]


def dropped_fractions(model, inputs):
    """Per block, the fraction of samples whose output is their input (block skipped); and the output."""
    pairs = []
    hooks = [b.register_forward_hook(lambda m, i, o: pairs.append((i[0], o[0] if isinstance(o, tuple) else o)))
             for b in blocks_of(model)]
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    for hook in hooks:
        hook.remove()
    return [float((o == i).flatten(1).all(1).float().mean()) for i, o in pairs], out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_layer_dropout_drops_samples_at_the_stated_rates_and_never_in_eval(family):
    model = causal_model(family, layers=3, layer_dropout_max=0.6)
    inputs = {"input_ids": torch.randint(3, V, (600, 3), generator=torch.Generator().manual_seed(0))}
    torch.manual_seed(1)
    fractions, out = dropped_fractions(model.train(), inputs)
    rates = et.layer_dropout_rates(3, 0.6)  # 0, 0.6 (sqrt(2) - 1) = 0.249, 0.6
    assert fractions[0] == 0.0
    assert fractions[1] == pytest.approx(rates[1], abs=0.06) and fractions[2] == pytest.approx(rates[2], abs=0.06)
    # HF's recorded hidden states see the dropped outputs: a sample skipping block 2 has h_2 = h_1
    same = (out.hidden_states[2] == out.hidden_states[1]).flatten(1).all(1).float().mean()
    assert float(same) == pytest.approx(fractions[1])
    fractions, _ = dropped_fractions(model.eval(), inputs)
    assert fractions == [0.0, 0.0, 0.0]
    plain = FAMILIES[family][1](model.config).eval()
    plain.load_state_dict(model.state_dict())
    assert torch.equal(model(**inputs).logits, plain(**inputs).logits)  # eval: exactly the plain model


def test_layer_dropout_on_t5s_decoder():
    config = update_autoconfig(copy_config(dropout_rate=0.0), AdditionalArguments(layer_dropout_max=0.8,
                                                                                   layer_dropout_scale="uniform"))
    torch.manual_seed(0)
    model = TrainT5ForConditionalGeneration(config).train()
    source, labels = copy_batch(torch.Generator().manual_seed(0), 200, 4, 32)
    pairs = []
    hooks = [b.register_forward_hook(lambda m, i, o: pairs.append((i[0], o[0]))) for b in model.decoder.block]
    model(input_ids=source, labels=labels)
    for hook in hooks:
        hook.remove()
    fractions = [float((o == i).flatten(1).all(1).float().mean()) for i, o in pairs]
    assert all(f == pytest.approx(0.8, abs=0.1) for f in fractions)


# ----- the runner's classes, LoRA, save and load -----------------------------------------------------
def test_train_classes_cover_the_families():
    for family, (config, hf_class) in FAMILIES.items():
        assert config(1).model_type == family
        assert issubclass(TRAIN_CLASSES[family], hf_class) and issubclass(TRAIN_CLASSES[family], et.EarlyExitTrainingMixin)


@pytest.mark.parametrize("family, targets", [("llama", {"q_proj", "v_proj"}), ("gpt2", {"c_attn"})])
def test_lora_defaults_save_and_load_round_trip(family, targets, tmp_path):
    model = causal_model(family, use_lora=True, lora_rank=4, lora_alpha=8, lora_dropout=0.0,
                         output_hidden_states_decoder=True, intermediate_loss_fn="layerskip")
    model = et.prepare_for_training(model)
    adapted = {n.split(".lora_A")[0].split(".")[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == targets
    with torch.no_grad():  # LoRA's B starts at zero: make the adapters matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    inputs = causal_batch()
    model.eval()
    expected_logits, expected_loss = (lambda o: (o.logits, float(o.loss)))(model(**inputs))
    et.save_checkpoint(model, None, str(tmp_path))
    loaded = TRAIN_CLASSES[family].from_pretrained(str(tmp_path)).eval()
    out = loaded(**inputs)
    assert torch.allclose(out.logits, expected_logits, atol=1e-5)
    assert float(out.loss) == pytest.approx(expected_loss, rel=1e-5)
    assert loaded.config.intermediate_loss_fn == "layerskip" and loaded.config.use_cache


def test_meta_head_survives_save_and_load(tmp_path):
    model = causal_model("qwen2", output_hidden_states_decoder=True, train_meta_cm_head=True)
    et.save_checkpoint(model, None, str(tmp_path))
    loaded = TRAIN_CLASSES["qwen2"].from_pretrained(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(model.cm_head.parameters(), loaded.cm_head.parameters()))


# ----- bad flags ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (dict(early_exit_curriculum="rotational"), "early_exit_curriculum='rotational' needs early_exit_rotation_interval"),
    (dict(early_exit_curriculum="gradual", early_exit_rotation_interval=2), "early_exit_rotation_interval only acts"),
    (dict(early_exit_curriculum="sideways"), "early_exit_curriculum='sideways' is unknown"),
    (dict(early_exit_scale_type="cubic"), "early_exit_scale_type='cubic' is unknown"),
    (dict(early_exit_loss_scale=0.0), r"early_exit_loss_scale=0.0 must lie in \(0, inf\]"),
    (dict(early_exit_curriculum="rotational", early_exit_rotation_interval=0), "early_exit_rotation_interval=0 must"),
    (dict(intermediate_loss_fn="ce", early_exit_loss_scale=0.5), "early_exit_loss_scale only act with intermediate_loss_fn='layerskip'"),
    (dict(intermediate_loss_fn=None, early_exit_curriculum="gradual"), "early_exit_curriculum only act"),
    (dict(layer_dropout_max=1.0), r"layer_dropout_max=1.0 must lie in \[0, 1\)"),
    (dict(layer_dropout_scale="exp"), "layer_dropout_scale only acts with layer_dropout_max"),
    (dict(layer_dropout_max=0.1, layer_dropout_scale="cubic"), "layer_dropout_scale='cubic' is unknown"),
    (dict(intermediate_loss_fn=None, train_meta_cm_head=True, layer_dropout_max=0.1), "layer_dropout_max cannot be combined with train_meta_cm_head"),
])
def test_bad_layerskip_flags_are_errors_naming_the_flag(flags, message):
    args = dict(output_hidden_states_decoder=True, intermediate_loss_fn="layerskip")
    args.update(flags)
    with pytest.raises(ValueError, match=message):
        validate_additional_args(AdditionalArguments(**args), 4)
