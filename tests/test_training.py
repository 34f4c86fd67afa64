"""Training exits (issue 6): the losses, the meta head, LoRA, checkpoints, bad input."""

import math
import os

import pytest
import torch

from engine_helpers import assert_training_lowers_every_layers_loss
from transformers import AutoConfig

from models import modeling_t5 as mt
from models.decode_loop import output_logits
from models.deploying_t5 import DeployT5ForConditionalGeneration
from models.modeling_t5 import TrainT5ForConditionalGeneration
from util.additional_args import AdditionalArguments, update_autoconfig, validate_additional_args
from util.copy_task import copy_batch, copy_config
from util.toy_models import train_toy_tokenizer

LN2, LN3 = math.log(2), math.log(3)


def kl2(a: float, b: float) -> float:
    """KL((a, 1-a) || (b, 1-b))."""
    return a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))


# ----- the losses on hand-made logits ------------------------------------------------------------
# three layers, one sequence of three tokens over a vocabulary of two; the last token is ignored
LABELS = torch.tensor([[0, 1, -100]])
LAYER_LOGITS = [
    torch.tensor([[[0.0, 0.0], [LN3, 0.0], [50.0, 0.0]]]),  # p: (1/2, 1/2), (3/4, 1/4)
    torch.tensor([[[0.0, LN2], [0.0, 0.0], [0.0, 50.0]]]),  # p: (1/3, 2/3), (1/2, 1/2)
    torch.tensor([[[0.0, LN3], [LN3, 0.0], [9.0, 0.0]]]),   # p: (1/4, 3/4), (3/4, 1/4)
]
CE = [(LN2 + math.log(4)) / 2, (LN3 + LN2) / 2, (math.log(4) + math.log(4)) / 2]
# KL(teacher || student = layer 1) per valid token, for teachers layer 2 and layer 3
KL_TO_SHALLOW = {2: [kl2(1 / 3, 1 / 2), kl2(1 / 2, 3 / 4)], 3: [kl2(1 / 4, 1 / 2), kl2(3 / 4, 3 / 4)]}


def test_cross_entropy_losses_match_hand_computed_values():
    assert float(mt.cross_entropy(LAYER_LOGITS[0], LABELS)) == pytest.approx(CE[0], abs=1e-6)
    assert float(mt.ce_loss(LAYER_LOGITS, LABELS)) == pytest.approx(sum(CE) / 3, abs=1e-6)
    assert float(mt.weighted_ce_loss(LAYER_LOGITS, LABELS)) == pytest.approx((CE[0] + 2 * CE[1] + 3 * CE[2]) / 6, abs=1e-6)
    shallow_deep = mt.shallow_deep_ce(LAYER_LOGITS[0], LAYER_LOGITS[2], LABELS, k=1, L=3)
    assert float(shallow_deep) == pytest.approx((CE[0] + 3 * CE[2]) / 4, abs=1e-6)


def test_kl_distillation_losses_match_hand_computed_values():
    student, teachers = LAYER_LOGITS[0], LAYER_LOGITS[1:]
    last = mt.kl_distillation("shallowdeep_kl_last", student, teachers, LABELS)
    assert float(last) == pytest.approx(sum(KL_TO_SHALLOW[3]) / 2, abs=1e-6)
    dyna = mt.kl_distillation("shallowdeep_kl_dyna", student, teachers, LABELS)
    closest = [min(KL_TO_SHALLOW[2][t], KL_TO_SHALLOW[3][t]) for t in range(2)]
    assert float(dyna) == pytest.approx(sum(closest) / 2, abs=1e-6)
    assert float(dyna) < float(last)  # the closest teacher differs from the last one on token 0

    unif = mt.kl_distillation("shallowdeep_kl_unif", student, teachers, LABELS, torch.Generator().manual_seed(3))
    drawn = torch.randint(2, (1, 3), generator=torch.Generator().manual_seed(3))[0]  # the same draws
    expected = [KL_TO_SHALLOW[2 + int(drawn[t])][t] for t in range(2)]
    assert float(unif) == pytest.approx(sum(expected) / 2, abs=1e-6)


def test_kl_distillation_teacher_gets_no_gradient():
    student = LAYER_LOGITS[0].clone().requires_grad_()
    teacher = LAYER_LOGITS[2].clone().requires_grad_()
    mt.kl_distillation("shallowdeep_kl_last", student, [teacher], LABELS).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_meta_labels_and_balanced_loss():
    agreement = mt.meta_labels(LAYER_LOGITS, LABELS)
    # argmax per layer: layer 1 (tie -> 0, 0, 0), layer 2 (1, 0, 1), layer 3 (1, 0, 0)
    assert agreement.tolist() == [[[0, 1, 1]], [[1, 1, 0]]]

    scores = torch.tensor([[0.0, 0.0], [LN3, 0.0], [0.0, LN3]])
    targets = torch.tensor([0, 0, 1])
    # class 0: mean of ln 2 and ln(4/3); class 1: ln(4/3); then the mean of the two classes
    expected = ((LN2 + math.log(4 / 3)) / 2 + math.log(4 / 3)) / 2
    assert float(mt.balanced_cross_entropy(scores, targets)) == pytest.approx(expected, abs=1e-6)


# ----- the model -----------------------------------------------------------------------------------
def train_model(seed=0, **flags) -> TrainT5ForConditionalGeneration:
    config = update_autoconfig(copy_config(), AdditionalArguments(**flags))
    torch.manual_seed(seed)
    return TrainT5ForConditionalGeneration(config)


def batch(seed=0, size=8):
    source, labels = copy_batch(torch.Generator().manual_seed(seed), size, 6, 32)
    labels[0, -2:] = -100  # some padding
    return {"input_ids": source, "labels": labels}


def raw_block_logits(model, inputs):
    """Every decoder block's head through hooks on the blocks themselves (an independent path)."""
    outputs = []
    hooks = [block.register_forward_hook(lambda m, i, o: outputs.append(o[0] if isinstance(o, tuple) else o))
             for block in model.decoder.block]
    try:
        model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return [output_logits(model, h) for h in outputs[-len(model.decoder.block):]]


@pytest.mark.parametrize("loss_fn", ["ce", "weighted_ce"])
def test_model_loss_uses_every_block_output_through_the_decode_head(loss_fn):
    model = train_model(output_hidden_states_decoder=True, intermediate_loss_fn=loss_fn).eval()
    inputs = batch()
    logits = raw_block_logits(model, {"input_ids": inputs["input_ids"], "labels": inputs["labels"]})
    expected = mt.ce_loss(logits, inputs["labels"]) if loss_fn == "ce" else mt.weighted_ce_loss(logits, inputs["labels"])
    assert float(model(**inputs).loss) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("loss_fn", ["shallowdeep_kl_last", "shallowdeep_kl_dyna"])
def test_model_kl_loss_mixes_ce_and_kl(loss_fn):
    model = train_model(output_hidden_states_decoder=True, intermediate_loss_fn=loss_fn, shallow_exit_layer=2,
                        distill_layer_alpha=0.25).eval()
    inputs = batch()
    logits = raw_block_logits(model, inputs)
    ce = mt.shallow_deep_ce(logits[1], logits[3], inputs["labels"], 2, 4)
    kd = mt.kl_distillation(loss_fn, logits[1], logits[2:], inputs["labels"])
    assert float(model(**inputs).loss) == pytest.approx(float(0.75 * ce + 0.25 * kd), rel=1e-5)


# ----- FREE's layerwise distillation (issue 13, item 1), against a slow float64 re-computation ----------
# FREE's TEACHER_LAYERS exactly as util/losses.py writes it: 0-based indices into its list of
# decoder states, whose index i is the state after block i + 1
FREE_TABLE_0_BASED = {24: {12: [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23], 10: [2, 5, 7, 10, 12, 15, 17, 19, 21, 23],
                           8: [2, 5, 8, 11, 14, 17, 20, 23], 6: [3, 7, 11, 15, 19, 23], 4: [5, 11, 17, 23]},
                      12: {3: [3, 7, 11]}}


def block_states(model, inputs):
    """Raw output h_l of every decoder block l = 1..L, through hooks on the blocks."""
    outputs = []
    hooks = [block.register_forward_hook(lambda m, i, o: outputs.append(o[0] if isinstance(o, tuple) else o))
             for block in model.decoder.block]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return [None] + outputs[-len(model.decoder.block):]


def slow_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    difference = (a - b).flatten().tolist()
    return sum(x * x for x in difference) / len(difference)


def slow_ce(logits: torch.Tensor, labels: torch.Tensor) -> float:
    total, count = 0.0, 0
    for row in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            label = int(labels[row, t])
            if label != -100:
                z = logits[row, t].tolist()
                top = max(z)
                total += top + math.log(sum(math.exp(v - top) for v in z)) - z[label]
                count += 1
    return total / count


def slow_free_loss(model, inputs, name: str, k: int, alpha: float) -> float:
    """FREE's CE_sd + alpha KD written from its formulas, in float64 Python arithmetic."""
    L = len(model.decoder.block)
    h = block_states(model, inputs)
    n = [None] + [model.decoder.final_layer_norm(h[layer]) for layer in range(1, L + 1)]
    labels = inputs["labels"]
    ce_sd = (k * slow_ce(output_logits(model, h[k]), labels) + L * slow_ce(output_logits(model, h[L]), labels)) / (k + L)
    transform = getattr(model, "layer_transformation", None)
    student = [None] + [n[j] @ transform.weight.T if transform is not None else n[j] for j in range(1, k + 1)]
    if name == "shallowdeep_kd_last":
        return ce_sd + alpha * slow_mse(n[L], student[k])
    table = FREE_TABLE_0_BASED.get(L, {}).get(k)
    teacher = [i + 1 for i in table] if table else [math.ceil(j * L / k) for j in range(1, k + 1)]
    mse = [[slow_mse(n[teacher[a]], student[j + 1]) for j in range(k)] for a in range(k)]
    if name == "shallowdeep_kd_unif":
        return ce_sd + alpha * sum(mse[a][a] for a in range(k)) / k
    chosen, below = {}, k  # from the deepest teacher down, the best student below the previous choice
    for a in reversed(range(k)):
        chosen[a] = min(range(below), key=lambda j: mse[a][j]) if below else chosen[a + 1]
        below = chosen[a]
    return ce_sd + alpha * sum(mse[a][chosen[a]] for a in range(k)) / k


def free_model(L: int, k: int, name: str, transform: bool, alpha=0.7):
    config = update_autoconfig(copy_config(num_decoder_layers=L, d_model=16, d_kv=4, num_heads=2, d_ff=32),
                               AdditionalArguments(output_hidden_states_decoder=True, intermediate_loss_fn=name,
                                                   shallow_exit_layer=k, distill_layer_alpha=alpha,
                                                   do_layer_transformation=transform))
    torch.manual_seed(L + k)
    model = TrainT5ForConditionalGeneration(config).double().eval()
    if transform:  # a map that is not the identity, so that applying it matters
        with torch.no_grad():
            model.layer_transformation.weight.add_(0.3 * torch.randn(16, 16, dtype=torch.float64))
    return model


@pytest.mark.parametrize("L, k", [(24, 6), (24, 10), (24, 7), (12, 3), (6, 2)])
@pytest.mark.parametrize("name", mt.KD_LOSSES)
@pytest.mark.parametrize("transform", [False, True])
def test_free_distillation_losses_equal_a_slow_recomputation(L, k, name, transform):
    if name == "shallowdeep_kd_last" and (L, k) not in ((24, 6), (6, 2)):
        pytest.skip("_last does not depend on the layer map")
    model = free_model(L, k, name, transform)
    inputs = batch(size=3)
    expected = slow_free_loss(model, inputs, name, k, 0.7)
    assert float(model(**inputs).loss) == pytest.approx(expected, rel=1e-9)
    ce_only = slow_free_loss(model, inputs, name, k, 0.0)
    assert abs(expected - ce_only) > 1e-4  # the distillation term is really there


def test_uniform_teacher_layers_are_freees_table_or_the_stated_rule():
    assert mt.uniform_teacher_layers(24, 6) == [4, 8, 12, 16, 20, 24]
    assert mt.uniform_teacher_layers(24, 10) == [3, 6, 8, 11, 13, 16, 18, 20, 22, 24]  # FREE's, not the rule
    assert mt.uniform_teacher_layers(24, 7) == [4, 7, 11, 14, 18, 21, 24]  # ceil(24 j / 7)
    assert mt.uniform_teacher_layers(6, 4) == [2, 3, 5, 6]


def test_dynamic_alignment_goes_down_from_the_deepest_teacher():
    # teachers (rows) 0..2, students (columns) 0..2; the deepest picks first, each below the last
    assert mt.dynamic_alignment(torch.tensor([[1.0, 0.0, 0.0], [5.0, 4.0, 0.0], [3.0, 1.0, 2.0]])) == [0, 0, 1]
    assert mt.dynamic_alignment(torch.tensor([[9.0, 0.0, 9.0], [0.0, 9.0, 9.0], [9.0, 9.0, 0.0]])) == [0, 0, 2]
    assert mt.dynamic_alignment(torch.tensor([[0.0, 1.0], [1.0, 0.0]])) == [0, 1]


def test_free_distillation_teachers_get_no_gradient():
    """The deepest block only produces the teacher n_L of _last: its gradient is CE_sd's alone."""
    grads = {}
    for name in ("shallowdeep_ce", "shallowdeep_kd_last"):
        flags = dict(output_hidden_states_decoder=True, intermediate_loss_fn=name, shallow_exit_layer=2)
        model = train_model(seed=5, **flags, **({"distill_layer_alpha": 0.7} if name != "shallowdeep_ce" else {}))
        model.eval()(**batch()).loss.backward()
        grads[name] = [p.grad.clone() for p in model.decoder.block[3].parameters() if p.grad is not None]
        shallow_grads = [p.grad for p in model.decoder.block[0].parameters() if p.grad is not None]
        grads[name + " shallow"] = [g.clone() for g in shallow_grads]
    assert grads["shallowdeep_ce"] and all(torch.allclose(a, b, atol=1e-7) for a, b in
                                           zip(grads["shallowdeep_ce"], grads["shallowdeep_kd_last"]))
    assert any(not torch.allclose(a, b) for a, b in
               zip(grads["shallowdeep_ce shallow"], grads["shallowdeep_kd_last shallow"]))  # students do learn


@pytest.mark.parametrize("loss_fn", ["shallowdeep_kd_last", "shallowdeep_kl_last"])
def test_layer_transformation_starts_as_identity_and_learns(loss_fn):
    flags = dict(output_hidden_states_decoder=True, intermediate_loss_fn=loss_fn,
                 shallow_exit_layer=2, distill_layer_alpha=0.5)
    plain, transformed = train_model(**flags).eval(), train_model(do_layer_transformation=True, **flags).eval()
    assert torch.equal(transformed.layer_transformation.weight, torch.eye(64))
    inputs = batch()
    assert float(transformed(**inputs).loss) == pytest.approx(float(plain(**inputs).loss), rel=1e-6)
    transformed(**inputs).loss.backward()
    assert transformed.layer_transformation.weight.grad.abs().sum() > 0


def test_a_few_steps_lower_every_layers_loss():
    model = train_model(output_hidden_states_decoder=True, intermediate_loss_fn="weighted_ce", seed=1)
    assert_training_lowers_every_layers_loss(model, lambda seed: batch(seed=seed, size=16), steps=25)


def test_meta_head_training_freezes_the_model_and_lowers_its_loss():
    model = train_model(output_hidden_states_decoder=True, train_meta_cm_head=True, seed=2)
    model = mt.prepare_for_training(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("cm_head.") for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = batch(size=16)
    first = float(model(**inputs).loss)
    for _ in range(15):
        loss = model(**inputs).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert float(model(**inputs).loss) < first
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_meta_head_loss_matches_its_definition():
    model = train_model(output_hidden_states_decoder=True, train_meta_cm_head=True, seed=3).eval()
    inputs = batch()
    logits = raw_block_logits(model, inputs)
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o[0])) for b in model.decoder.block[:-1]]
    model(input_ids=inputs["input_ids"], labels=inputs["labels"])
    for hook in hooks:
        hook.remove()
    states = [model.decoder.final_layer_norm(h) for h in outputs]
    agreement = mt.meta_labels(logits, inputs["labels"])
    valid = (inputs["labels"] != -100).expand_as(agreement)
    scores = model.cm_head(torch.stack(states))[valid]
    expected = mt.balanced_cross_entropy(scores, agreement[valid])
    assert float(model(**inputs).loss) == pytest.approx(float(expected), rel=1e-5)


def test_meta_head_labels_come_from_the_backbone_without_dropout():
    """The Trainer calls the model in train mode: the frozen backbone must still run without dropout."""
    config = update_autoconfig(copy_config(dropout_rate=0.5),
                               AdditionalArguments(output_hidden_states_decoder=True, train_meta_cm_head=True))
    torch.manual_seed(6)
    model = mt.prepare_for_training(TrainT5ForConditionalGeneration(config))
    inputs = batch()
    expected = float(model.eval()(**inputs).loss)  # eval mode: no dropout anywhere
    model.train()
    assert [float(model(**inputs).loss) for _ in range(3)] == [pytest.approx(expected, rel=1e-6)] * 3
    assert model.training and model.decoder.training  # its mode is given back


# ----- LoRA ----------------------------------------------------------------------------------------
def test_lora_merged_equals_unmerged_and_trains_only_adapters():
    model = mt.prepare_for_training(train_model(use_lora=True, lora_rank=4, lora_alpha=8, lora_dropout=0.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".q.lora_A" in n for n in trainable) and any(".v.lora_A" in n for n in trainable)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapters do something
                parameter.normal_(std=0.5)
    model.eval()
    inputs = batch()
    unmerged = model(**inputs).logits
    merged_model = mt.merged_for_saving(model)
    assert not any("lora" in n for n, _ in merged_model.named_parameters())
    merged = merged_model(**inputs).logits
    assert torch.allclose(merged, unmerged, atol=1e-5)
    assert (merged - train_model()(**inputs).logits).abs().max() > 1e-3  # the adapters changed something


def test_lora_unknown_target_module_is_a_clear_error():
    model = train_model(use_lora=True, lora_target_modules=["q", "query_proj"])
    with pytest.raises(ValueError, match="lora_target_modules: query_proj not found.*wo"):
        mt.prepare_for_training(model)


# ----- checkpoints ---------------------------------------------------------------------------------
def test_checkpoint_reloads_complete_and_decodes_identically(tmp_path):
    tokenizer = train_toy_tokenizer(["the cat sat on the mat"] * 4, vocab_size=40)
    model = train_model(output_hidden_states_decoder=True, train_meta_cm_head=True, seed=4).eval()
    with torch.no_grad():  # a head that lets some tokens exit
        model.cm_head[2].bias.copy_(torch.tensor([0.0, 0.3]))
    path = str(tmp_path / "checkpoint")
    mt.save_checkpoint(model, tokenizer, path)
    assert os.path.isfile(os.path.join(path, "tokenizer.json"))

    config = AutoConfig.from_pretrained(path)
    assert config.train_meta_cm_head is True and config.intermediate_loss_fn is None  # the flags travel
    flags = AdditionalArguments(use_early_exit=True, exit_conf_type="meta", exit_conf_threshold=0.55)
    reloaded = DeployT5ForConditionalGeneration.from_pretrained(path, config=update_autoconfig(config, flags)).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name

    in_memory = DeployT5ForConditionalGeneration(reloaded.config).eval()
    in_memory.load_state_dict(model.state_dict())
    source = batch()["input_ids"][:3]
    expected = in_memory.generate(input_ids=source, max_new_tokens=8)
    exits = in_memory.exit_stats()["exit_layers"]
    assert torch.equal(reloaded.generate(input_ids=source, max_new_tokens=8), expected)
    assert reloaded.exit_stats()["exit_layers"] == exits
    assert any(e < 4 for row in exits for e in row)  # the meta head was used and let tokens exit


# ----- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (dict(intermediate_loss_fn="ce"), "output_hidden_states_decoder"),
    (dict(output_hidden_states_decoder=True, intermediate_loss_fn="shallowdeep_kd_dyna", shallow_exit_layer=2),
     "distill_layer_alpha"),
    (dict(output_hidden_states_decoder=True, intermediate_loss_fn="shallowdeep_kd_last", distill_layer_alpha=0.5),
     "shallow_exit_layer"),
    (dict(output_hidden_states_decoder=True, intermediate_loss_fn="shallowdeep_ce"), "shallow_exit_layer"),
    (dict(output_hidden_states_decoder=True, intermediate_loss_fn="weighted_ce", distill_layer_alpha=0.5),
     "distill_layer_alpha"),
    (dict(do_layer_transformation=True), "do_layer_transformation"),
    (dict(output_hidden_states_decoder=True, intermediate_loss_fn="shallowdeep_kd_last", shallow_exit_layer=4,
          distill_layer_alpha=0.5), "shallow_exit_layer"),
])
def test_bad_training_flags_are_clear_errors(flags, message):
    with pytest.raises(ValueError, match=message):
        validate_additional_args(AdditionalArguments(**flags), 4)


def test_meta_head_with_lora_is_refused():
    model = train_model(output_hidden_states_decoder=True, train_meta_cm_head=True, use_lora=True)
    with pytest.raises(ValueError, match="use_lora"):
        mt.prepare_for_training(model)


# ----- one rule for the meta head (issue 13, item 11) -----------------------------------------------
@pytest.mark.parametrize("flags, has_head", [
    (dict(use_shallow_deep=True, shallow_exit_layer=2, shallow2deep_conf_type="meta"), True),
    (dict(use_early_exit=True, exit_conf_type="meta"), True),
    (dict(output_hidden_states_decoder=True, train_meta_cm_head=True), True),
    (dict(use_shallow_deep=True, shallow_exit_layer=2, shallow2deep_conf_type="softmax"), False),
])
def test_training_and_deploy_models_agree_on_the_meta_head(flags, has_head):
    from models import deploying_t5

    config = update_autoconfig(copy_config(), AdditionalArguments(**flags))
    assert hasattr(TrainT5ForConditionalGeneration(config), "cm_head") is has_head
    assert hasattr(DeployT5ForConditionalGeneration(config), "cm_head") is has_head
    assert deploying_t5._uses_meta_head is mt.uses_meta_head  # one function, both sides


@pytest.mark.parametrize("loss_fn", ["shallowdeep_kl_last", "ce"])
def test_train_mode_heads_read_dropout_of_the_normed_state_as_free(loss_fn):
    """In train mode, FREE applies the decoder's dropout to norm(h_k) before the shallow head, as
    HF does before the last head. Re-derived with the same seed: HF's forward consumes the same
    random draws, then each intermediate state's dropout mask is the next draw."""
    import torch.nn.functional as F
    from transformers import T5ForConditionalGeneration

    extra = dict(shallow_exit_layer=2, distill_layer_alpha=0.0) if loss_fn.startswith("shallowdeep") else {}
    model = train_model(output_hidden_states_decoder=True, intermediate_loss_fn=loss_fn, **extra).train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    inputs = batch()
    torch.manual_seed(11)
    loss = float(model(**inputs).loss)
    torch.manual_seed(11)
    with torch.no_grad():
        out = T5ForConditionalGeneration.forward(model, **inputs, output_hidden_states=True, return_dict=True)
        L = model.config.num_decoder_layers
        layers = [2] if loss_fn.startswith("shallowdeep") else list(range(1, L))
        logits = {}
        for layer in layers:  # the loss draws the intermediate states' masks in this order
            normed = F.dropout(model.decoder.final_layer_norm(out.decoder_hidden_states[layer]), 0.5, training=True)
            logits[layer] = model.lm_head(normed * model.config.d_model ** -0.5)
        if loss_fn == "ce":
            expected = mt.ce_loss([logits[layer] for layer in layers] + [out.logits], inputs["labels"])
        else:
            expected = mt.shallow_deep_ce(logits[2], out.logits, inputs["labels"], 2, L)
    assert loss == pytest.approx(float(expected), rel=1e-5)
    torch.manual_seed(11)  # and it is not the loss without that dropout
    with torch.no_grad():
        out = T5ForConditionalGeneration.forward(model, **inputs, output_hidden_states=True, return_dict=True)
        plain = [output_logits(model, out.decoder_hidden_states[layer]) for layer in layers]
        if loss_fn == "ce":
            plain = mt.ce_loss(plain + [out.logits], inputs["labels"])
        else:
            plain = mt.shallow_deep_ce(plain[0], out.logits, inputs["labels"], 2, L)
    assert loss != pytest.approx(float(plain), rel=1e-3)


def frees_meta_checkpoint(path):
    """A checkpoint as FREE's trainer saves it after meta-head training: the training flags in
    its config (exit_conf_type='meta' with use_early_exit=False) and a bias-free meta head."""
    from models.confidence import build_meta_head

    model = train_model(output_hidden_states_decoder=True, train_meta_cm_head=True, seed=5).eval()
    model.config.exit_conf_type, model.config.use_early_exit = "meta", False
    torch.manual_seed(8)
    model.cm_head = build_meta_head(model.config.d_model, bias=False)
    with torch.no_grad():  # exit logit = -stay logit: confidences spread around 0.5
        model.cm_head[2].weight[1] = -model.cm_head[2].weight[0]
    model.save_pretrained(path)
    return model


def test_frees_meta_checkpoint_loads_decodes_and_keeps_a_bias_free_head(tmp_path, caplog):
    import logging

    path = str(tmp_path / "free")
    trained = frees_meta_checkpoint(path)
    with caplog.at_level(logging.WARNING, logger="models.deploying_t5"):
        model = DeployT5ForConditionalGeneration.from_pretrained(path).eval()
    assert "exit_conf_type='meta'" in caplog.text and "train_meta_cm_head=True" in caplog.text
    source = batch()["input_ids"][:2]
    model.generate(input_ids=source, max_new_tokens=4)  # the saved flags no longer stop decoding
    assert model.cm_head[0].bias is None and model.cm_head[2].bias is None
    states = torch.randn(5, model.config.d_model)
    with torch.no_grad():
        assert torch.equal(model.cm_head(states), trained.cm_head(states))
    # the user's flags are validated strictly and the bias-free head decodes with them
    with pytest.raises(ValueError, match="only acts with use_early_exit"):
        update_autoconfig(model.config, AdditionalArguments(exit_conf_type="meta"))
    update_autoconfig(model.config, AdditionalArguments(use_early_exit=True, exit_conf_type="meta",
                                                        exit_conf_threshold=0.3))
    model.generate(input_ids=source, max_new_tokens=6)
    assert any(e < 4 for row in model.exit_stats()["exit_layers"] for e in row)


def test_a_config_without_decoder_start_token_starts_from_pad():
    config = copy_config()
    del config.decoder_start_token_id
    assert not hasattr(config, "decoder_start_token_id") or config.decoder_start_token_id is None
    model = DeployT5ForConditionalGeneration(config).eval()
    model.generation_config.decoder_start_token_id = None
    out = model.generate(input_ids=batch()["input_ids"][:1], max_new_tokens=3)
    assert out[0, 0] == config.pad_token_id
