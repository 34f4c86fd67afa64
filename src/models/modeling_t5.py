"""T5 for training early exits: losses on intermediate decoder layers, the meta head, LoRA.

    model = TrainT5ForConditionalGeneration.from_pretrained(path, config=config)  # flags in config
    model = prepare_for_training(model)        # LoRA adapters / freezing for the meta head
    ... HF Trainer (or any loop): model(**batch).loss ...
    save_checkpoint(model, tokenizer, out)     # merges LoRA; reloads into DeployT5ForConditionalGeneration

Every intermediate prediction goes through `output_logits` of the decode loop, z_l = W s(norm(h_l)),
so that training optimises exactly the head decoding uses. Layers are numbered 1..L; h_l is the
raw output of decoder block l, and layer L's logits are the model's own.

Losses (`intermediate_loss_fn`); CE_l is the token-mean cross-entropy of layer l (labels -100 ignored):
- `ce`: (1/L) sum_l CE_l.
- `weighted_ce` (CALM): sum_l l CE_l / sum_l l.
- `shallowdeep_ce` (FREE): with k = `shallow_exit_layer`, CE_sd = (k CE_k + L CE_L) / (k + L),
  each of the two layers weighted by its depth, as FREE weights them.
- `shallowdeep_kd_*` (FREE's layerwise distillation): CE_sd + alpha KD, alpha =
  `distill_layer_alpha` (added, not a convex mix). KD is a mean squared error between decoder
  states as FREE takes them, n_l = dropout(norm(h_l)) (each block's output after the decoder's
  final layer norm; dropout is off in eval), averaged over every element of the batch (FREE
  masks no padding); teachers detached, students passed through the learnt map T when
  `do_layer_transformation` is on:
  - `_last`: MSE(n_L, T(n_k)).
  - `_unif`: student layer j = 1..k matched to teacher layer t(j); KD = mean over j of
    MSE(n_t(j), T(n_j)). t is FREE's table for L = 24 (k = 4, 6, 8, 10, 12) and L = 12 (k = 3),
    elsewhere the uniform rule t(j) = ceil(j L / k) (which FREE's table also follows except k = 10).
  - `_dyna`: FREE's dynamic alignment: with M[a, j] = MSE(n_t(a), T(n_j)), from the deepest
    teacher a = k down, teacher a is aligned with the student of lowest M[a, .] among those below
    the previous alignment (the previous one again if none is left); KD = mean over a of the
    aligned M.
- `shallowdeep_kl_*` (ours, a distribution-level variant): (1 - alpha) CE_sd + alpha KD, where
  KD is the token mean of KL(p_teacher || p_k), teacher distributions detached:
  - `_last`: the teacher is layer L.
  - `_unif`: every target token draws its teacher uniformly from layers k+1..L (a generator
    seeded once per model, so runs repeat).
  - `_dyna`: every token is distilled from the deep layer j in k+1..L whose distribution is
    closest to the shallow one, KD = mean over tokens of min_j KL(p_j || p_k).
  With `do_layer_transformation`, KD uses softmax(z(T h_k)); the CE term, and so decoding, keep
  the plain head on h_k, which the deploy model computes.

Meta head (`train_meta_cm_head`): the rest of the model is frozen and run in eval mode (no
dropout, as at decoding, even while the Trainer has the model in train mode); for every layer l in 1..L-1 and
every target token, label = 1 when argmax z_l equals argmax z_L, else 0; the head sees
norm(h_l) (as `meta_confidence` does at decoding). The loss is class-balanced: the mean over
the classes present of each class's mean cross-entropy, so the frequent class does not dominate.
"""

import os
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import T5ForConditionalGeneration
from transformers import initialization as init

from models.confidence import build_meta_head
from models.decode_loop import output_logits
from util.additional_args import AdditionalArguments, uses_meta_head

IGNORE = -100
KD_LOSSES = ("shallowdeep_kd_last", "shallowdeep_kd_unif", "shallowdeep_kd_dyna")  # FREE's, on hidden states
KL_LOSSES = ("shallowdeep_kl_last", "shallowdeep_kl_unif", "shallowdeep_kl_dyna")  # ours, on distributions
SHALLOW_DEEP_LOSSES = ("shallowdeep_ce",) + KD_LOSSES + KL_LOSSES
UNIFORM_TEACHER_SEED = 0
# FREE's uniform layer map (util/losses.py, TEACHER_LAYERS), in our 1-based layer numbers:
# decoder depth L -> shallow layer k -> the teacher layer of student layers 1..k
FREE_TEACHER_LAYERS = {
    24: {12: [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24],
         10: [3, 6, 8, 11, 13, 16, 18, 20, 22, 24],
         8: [3, 6, 9, 12, 15, 18, 21, 24],
         6: [4, 8, 12, 16, 20, 24],
         4: [6, 12, 18, 24]},
    12: {3: [4, 8, 12]},
}


# ----- the losses on logits (pure functions: tested on hand-computed values) -------------------
def token_mean(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of per-token values over the tokens whose label is not ignored."""
    mask = labels != IGNORE
    return values[mask].sum() / mask.sum().clamp(min=1)


def _wide(values: torch.Tensor) -> torch.Tensor:
    """At least float32 for the losses (bf16/fp16 widened, float64 kept)."""
    return values.to(torch.promote_types(values.dtype, torch.float32))


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy of (B, T, V) logits against (B, T) labels."""
    return F.cross_entropy(_wide(logits.flatten(0, -2)), labels.flatten(), ignore_index=IGNORE)


def kl_per_token(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || p_student) per token, the teacher detached; (..., V) -> (...)."""
    teacher = F.log_softmax(_wide(teacher_logits.detach()), dim=-1)
    student = F.log_softmax(_wide(student_logits), dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1)


def ce_loss(logits: List[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """logits[l-1] are layer l's; mean of the layers' cross-entropies."""
    return sum(cross_entropy(z, labels) for z in logits) / len(logits)


def weighted_ce_loss(logits: List[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """CALM: layer l's cross-entropy weighted by l / sum(l)."""
    weights = range(1, len(logits) + 1)
    return sum(w * cross_entropy(z, labels) for w, z in zip(weights, logits)) / sum(weights)


def shallow_deep_ce(shallow: torch.Tensor, last: torch.Tensor, labels: torch.Tensor, k: int, L: int) -> torch.Tensor:
    """FREE: the shallow (k) and last (L) layers' cross-entropies weighted by depth."""
    return (k * cross_entropy(shallow, labels) + L * cross_entropy(last, labels)) / (k + L)


def kl_distillation(kind: str, student: torch.Tensor, teachers: List[torch.Tensor], labels: torch.Tensor,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Our KL distillation of the shallow layer; teachers are layers k+1..L in order."""
    if kind == "shallowdeep_kl_last":
        return token_mean(kl_per_token(teachers[-1], student), labels)
    per_layer = torch.stack([kl_per_token(t, student) for t in teachers])  # (D, B, T)
    if kind == "shallowdeep_kl_unif":
        choice = torch.randint(len(teachers), labels.shape, generator=generator).to(per_layer.device)
        return token_mean(per_layer.gather(0, choice.unsqueeze(0)).squeeze(0), labels)
    if kind == "shallowdeep_kl_dyna":
        return token_mean(per_layer.min(dim=0).values, labels)
    raise ValueError(f"intermediate_loss_fn={kind!r} is not a KL distillation loss.")


def uniform_teacher_layers(num_layers: int, shallow_layer: int) -> List[int]:
    """Teacher layer of each student layer 1..k: FREE's table where it has one, else ceil(j L / k)."""
    table = FREE_TEACHER_LAYERS.get(num_layers, {})
    if shallow_layer in table:
        return list(table[shallow_layer])
    return [-(-j * num_layers // shallow_layer) for j in range(1, shallow_layer + 1)]


def dynamic_alignment(mse: torch.Tensor) -> List[int]:
    """FREE's alignment of teachers to students (0-based) from mse[a, j]: from the deepest teacher
    down, the student of lowest MSE below the previous alignment (the previous one if none is)."""
    alignment, bound = [], mse.shape[1]
    for a in range(mse.shape[0] - 1, -1, -1):
        candidates = range(bound)
        best = min(candidates, key=lambda j: float(mse[a, j])) if bound > 0 else alignment[-1]
        alignment.append(best)
        bound = best
    return alignment[::-1]


def hidden_distillation(kind: str, students: List[torch.Tensor], teachers: Dict[int, torch.Tensor],
                        num_layers: int) -> torch.Tensor:
    """FREE's KD: students[j-1] is T(n_j) for j = 1..k, teachers[l] is n_l (detached)."""
    k = len(students)
    if kind == "shallowdeep_kd_last":
        return F.mse_loss(students[-1], teachers[num_layers])
    targets = [teachers[layer] for layer in uniform_teacher_layers(num_layers, k)]
    if kind == "shallowdeep_kd_unif":
        return sum(F.mse_loss(s, t) for s, t in zip(students, targets)) / k
    if kind == "shallowdeep_kd_dyna":
        mse = torch.stack([torch.stack([F.mse_loss(s, t) for s in students]) for t in targets])  # (k, k)
        alignment = dynamic_alignment(mse.detach())
        return torch.stack([mse[a, j] for a, j in enumerate(alignment)]).mean()
    raise ValueError(f"intermediate_loss_fn={kind!r} is not a hidden-state distillation loss.")


def meta_labels(logits: List[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """(L-1, B, T): 1 where layer l's argmax equals the last layer's, for l in 1..L-1."""
    final = logits[-1].argmax(-1)
    return torch.stack([(z.argmax(-1) == final).long() for z in logits[:-1]])


def balanced_cross_entropy(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the classes present of each class's mean cross-entropy; scores (N, C), targets (N,)."""
    losses = F.cross_entropy(scores.float(), targets, reduction="none")
    per_class = [losses[targets == c].mean() for c in targets.unique()]
    return sum(per_class) / len(per_class)


def meta_head_loss(cm_head: nn.Module, normed_states: List[torch.Tensor], logits: List[torch.Tensor],
                   labels: torch.Tensor):
    """(loss, agreement labels) of the meta head on norm(h_l), l = 1..L-1, valid tokens only."""
    agreement = meta_labels(logits, labels)
    mask = (labels != IGNORE).unsqueeze(0).expand_as(agreement)
    scores = cm_head(torch.stack(normed_states))  # (L-1, B, T, 2)
    return balanced_cross_entropy(scores[mask], agreement[mask]), agreement


# ----- the model --------------------------------------------------------------------------------
class EarlyExitTrainingMixin:
    """The training `loss` with the intermediate layers chosen by the config's flags, over any
    T5-family class whose decoder is T5's (its hidden states, final norm, LM head). Put it before
    the HF class: `super().forward` is the HF model's own."""

    # our loss is a mean per token: the Trainer must scale it for gradient accumulation itself
    accepts_loss_kwargs = False

    def __init__(self, config):
        super().__init__(config)
        if uses_meta_head(config):
            self.cm_head = build_meta_head(config.d_model)
        if getattr(config, "do_layer_transformation", False):
            self.layer_transformation = nn.Linear(config.d_model, config.d_model, bias=False)
            with torch.no_grad():
                self.layer_transformation.weight.copy_(torch.eye(config.d_model))
        self._uniform_teacher = torch.Generator().manual_seed(UNIFORM_TEACHER_SEED)

    def _init_weights(self, module):
        # a T absent from the checkpoint starts as the identity (init.* skips loaded weights)
        if module is getattr(self, "layer_transformation", None):
            init.eye_(module.weight)
            return
        super()._init_weights(module)

    def training_args(self) -> AdditionalArguments:
        return AdditionalArguments.from_config(self.config)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        args = self.training_args()
        wants_layers = labels is not None and (args.intermediate_loss_fn is not None or args.train_meta_cm_head)
        if not wants_layers:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        kwargs["output_hidden_states"] = True
        kwargs["return_dict"] = True
        if args.train_meta_cm_head:
            # the model is frozen: only the meta head learns. Its inputs and labels (agreement with
            # the last layer) come from the backbone in eval mode, as at decoding: no dropout.
            was_training = self.training
            self.train(False)
            try:
                with torch.no_grad():
                    out = super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
            finally:
                self.train(was_training)
            out.loss = self._meta_loss(out, labels)
        else:
            out = super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
            out.loss = self._intermediate_loss(args, out, labels)
        return out

    # hidden states: decoder_hidden_states = (embeddings, blocks 1..L-1 raw, block L after the final norm)
    def _block_output(self, out, layer: int) -> torch.Tensor:
        return out.decoder_hidden_states[layer]

    def _layer_logits(self, out, layer: int) -> torch.Tensor:
        """z_l = W s(dropout(norm(h_l))): as FREE, the dropout HF applies after the final norm
        before the last head is applied before every intermediate head too (train mode only)."""
        if layer == self.config.num_decoder_layers:
            return out.logits  # the model's own head on dropout(norm(h_L))
        normed = self._normed_state(out, layer)
        if self.config.scale_decoder_outputs:
            normed = normed * self.model_dim ** -0.5
        return self.lm_head(normed)

    def _intermediate_loss(self, args: AdditionalArguments, out, labels: torch.Tensor) -> torch.Tensor:
        L = self.config.num_decoder_layers
        name = args.intermediate_loss_fn
        if name in ("ce", "weighted_ce"):
            logits = [self._layer_logits(out, layer) for layer in range(1, L + 1)]
            return ce_loss(logits, labels) if name == "ce" else weighted_ce_loss(logits, labels)
        k = args.shallow_exit_layer
        shallow, last = self._layer_logits(out, k), out.logits
        loss = shallow_deep_ce(shallow, last, labels, k, L)
        transform = getattr(self, "layer_transformation", None)
        alpha = args.distill_layer_alpha
        if name in KD_LOSSES:
            students = [self._normed_state(out, layer) for layer in range(1, k + 1)]
            if transform is not None:
                students = [transform(state) for state in students]
            needed = {L} if name == "shallowdeep_kd_last" else set(uniform_teacher_layers(L, k))
            teachers = {layer: self._normed_state(out, layer).detach() for layer in needed}
            return loss + alpha * hidden_distillation(name, students, teachers, L)
        if name not in KL_LOSSES:
            return loss
        student = shallow
        if transform is not None:
            student = output_logits(self, transform(self._block_output(out, k)))
        if name == "shallowdeep_kl_last":
            teachers = [last]
        else:
            with torch.no_grad():  # teachers only: no graph for the layers between k and L
                teachers = [self._layer_logits(out, layer) for layer in range(k + 1, L)]
            teachers.append(last)
        kd = kl_distillation(name, student, teachers, labels, self._uniform_teacher)
        return (1 - alpha) * loss + alpha * kd

    def _normed_state(self, out, layer: int) -> torch.Tensor:
        """n_l = dropout(norm(h_l)), FREE's decoder hidden state; HF's last one is already that."""
        if layer == self.config.num_decoder_layers:
            return out.decoder_hidden_states[layer]
        return self.decoder.dropout(self.decoder.final_layer_norm(self._block_output(out, layer)))

    def _meta_loss(self, out, labels: torch.Tensor) -> torch.Tensor:
        L = self.config.num_decoder_layers
        norm = self.decoder.final_layer_norm
        # the backbone ran in eval mode: its heads without dropout, as at decoding
        logits = [output_logits(self, self._block_output(out, layer)) for layer in range(1, L)] + [out.logits]
        states = [norm(self._block_output(out, layer)) for layer in range(1, L)]
        loss, _ = meta_head_loss(self.cm_head, states, logits, labels)
        return loss


class TrainT5ForConditionalGeneration(EarlyExitTrainingMixin, T5ForConditionalGeneration):
    """HF's T5 whose `loss` includes the intermediate layers chosen by the config's flags."""


# ----- LoRA, freezing, saving -----------------------------------------------------------------------
def linear_module_names(model: nn.Module) -> List[str]:
    """Last name parts of the model's linear layers (what `lora_target_modules` may name)."""
    return sorted({name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def check_lora_targets(model: nn.Module, targets: List[str]) -> None:
    available = linear_module_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise ValueError(f"lora_target_modules: {', '.join(missing)} not found in the model; "
                         f"its linear layers are: {', '.join(available)}.")


def add_lora(model: nn.Module, args: AdditionalArguments):
    """Wrap the model with peft LoRA adapters (default targets: T5's attention q and v)."""
    from peft import LoraConfig, TaskType, get_peft_model

    targets = list(args.lora_target_modules or ["q", "v"])
    check_lora_targets(model, targets)
    extra = [name for name in ("cm_head", "layer_transformation") if getattr(model, name, None) is not None]
    config = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=args.lora_rank, lora_alpha=args.lora_alpha,
                        lora_dropout=args.lora_dropout, target_modules=targets, modules_to_save=extra or None)
    return get_peft_model(model, config)


def freeze_all_but_meta_head(model: nn.Module) -> None:
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith("cm_head.")


def prepare_for_training(model: EarlyExitTrainingMixin):
    """Apply the config's training flags that change which weights learn; return the model to train."""
    args = model.training_args()
    if args.train_meta_cm_head:
        if getattr(model, "cm_head", None) is None:
            raise ValueError("train_meta_cm_head needs the meta head: build the model with that flag in its config.")
        if args.use_lora:
            raise ValueError("train_meta_cm_head trains the meta head alone: it cannot be combined with use_lora.")
        freeze_all_but_meta_head(model)
    if args.use_lora:
        return add_lora(model, args)
    return model


def merged_for_saving(model: nn.Module) -> nn.Module:
    """The plain model to save or evaluate: LoRA adapters merged into the weights, and the KV cache
    switched back on in its config and generation config (training turns it off; a checkpoint that
    kept it off would silently slow HF generate, and disable early exit under FREE's code)."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.config.use_cache = True
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = True
    return model


def save_checkpoint(model: nn.Module, tokenizer, path: str) -> nn.Module:
    """Save weights (LoRA merged, meta head included), config with the exit flags, and tokenizer."""
    model = merged_for_saving(model)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return model


def layer_losses(model: EarlyExitTrainingMixin, batch: Dict[str, torch.Tensor]) -> List[float]:
    """Cross-entropy of every decoder layer's head on a batch (a diagnostic: which layers have learnt)."""
    with torch.no_grad():
        # the HF model's own forward (its plain loss), whichever T5-family class the model is
        out = super(EarlyExitTrainingMixin, model).forward(**batch, output_hidden_states=True, return_dict=True)
        L = model.config.num_decoder_layers
        return [float(cross_entropy(model._layer_logits(out, layer), batch["labels"])) for layer in range(1, L + 1)]
