"""Training early exits, for any decoder: the intermediate losses, LayerSkip's recipe, the meta
head, LoRA and checkpoints, shared by T5 (models.modeling_t5) and the decoder-only models
(models.modeling_causal).

    model = TrainLlamaForCausalLM.from_pretrained(path, config=config)  # flags in config
    model = prepare_for_training(model)        # LoRA adapters / freezing for the meta head
    ... HF Trainer (+ CurriculumCallback with a LayerSkip curriculum): model(**batch).loss ...
    save_checkpoint(model, tokenizer, out)     # merges LoRA

An architecture tells `EarlyExitTrainingMixin` five things (its `_exit_*` methods): the depth L,
the per-layer hidden states of a forward pass, the head z(h) that maps a raw block output to
logits (the model's own final norm and LM head: what decoding uses), the blocks (for layer
dropout), and how labels align with logits (T5: as given; causal LMs: shifted by one, HF's
convention). Everything below is written once in terms of those.

Layers are numbered 1..L; h_l is the raw output of decoder block l; z_l = z(h_l), and layer
L's logits are the model's own. y are the labels aligned with the logits (-100 ignored).

Losses (`intermediate_loss_fn`); CE_l is the token-mean cross-entropy of z_l against y:
- `ce`: (1/L) sum_l CE_l.
- `weighted_ce` (CALM): sum_l l CE_l / sum_l l.
- `shallowdeep_ce` (FREE): with k = `shallow_exit_layer`, CE_sd = (k CE_k + L CE_L) / (k + L),
  each of the two layers weighted by its depth, as FREE weights them.
- `shallowdeep_kd_*` (FREE's layerwise distillation): CE_sd + alpha KD, alpha =
  `distill_layer_alpha` (added, not a convex mix). KD is a mean squared error between decoder
  states as FREE takes them, n_l = dropout(norm(h_l)) (each block's output after the decoder's
  final norm; T5 has a dropout there, off in eval; decoder-only models have none), averaged
  over every element of the batch (FREE masks no padding); teachers detached, students passed
  through the learnt map T when `do_layer_transformation` is on:
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
- `layerskip` (Elhoushi et al. 2024, as torchtune implements it): at training step t,
  loss = sum over l in E(t) of w_l CE_l, w_l = c_l / sum_{j in E(t)} c_j, with
  c_l = e s(l) for l < L and c_L = s(L); e = `early_exit_loss_scale` (1.0), s =
  `early_exit_scale_type` (`sum_l` by default): uniform 1, `l` l, `sum_l` l(l+1)/2,
  `sqrt_l` sqrt(l), `inv_l` 1/l, `inv_sqrt_l` 1/sqrt(l). E(t), the layers the curriculum
  enables (L always), by `early_exit_curriculum`:
  - `none`: every layer 1..L.
  - `rotational` (every R = `early_exit_rotation_interval` layers, rotated by one layer per
    step): l is enabled when ((l - 1 - t) mod L) mod R = 0.
  - `gradual` (from the last layer down, all enabled at half of training): l is enabled when
    t / T >= (1/2) (L - l + 1) / L, T the total number of training steps.
  t and T come from `set_training_progress` (the Trainer's `CurriculumCallback` calls it);
  in eval mode every layer is enabled. Two choices differ from torchtune and are ours:
  torchtune's `sum_l` takes the cumulative sum over the enabled layers only (the same as ours
  when all are enabled), and its gradual curriculum lags one step behind t.

Layer dropout (`layer_dropout_max` = p_max, LayerSkip's recipe with S(t) = 1, as for fine-tuning):
in training mode each sample skips block l (its output is its input) with probability
p_l = p_max D(l), D by `layer_dropout_scale`: `exp` (default) 2^((l-1)/(L-1)) - 1, `linear`
(l-1)/(L-1), `uniform` 1 (D = 1 when L = 1). So block 1 is never dropped and block L at p_max.
Never in eval mode. The block is computed for every sample and its output replaced where
dropped (simple; torchtune skips the dropped samples' compute instead).

Meta head (`train_meta_cm_head`): the rest of the model is frozen and run in eval mode (no
dropout, as at decoding, even while the Trainer has the model in train mode); for every layer l in 1..L-1 and
every target token, label = 1 when argmax z_l equals argmax z_L, else 0; the head sees
norm(h_l) (as `meta_confidence` does at decoding). The loss is class-balanced: the mean over
the classes present of each class's mean cross-entropy, so the frequent class does not dominate.
"""

import math
import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback
from transformers import initialization as init
from transformers.pytorch_utils import Conv1D

from models.confidence import _wide, build_meta_head
from util.additional_args import (AdditionalArguments, early_exit_settings, layer_dropout_scale,
                                  uses_meta_head)

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


# ----- LayerSkip: per-layer scales, the curriculum, layer dropout rates (pure functions) --------
LAYERSKIP_SCALES = {  # s(l) for 1-based layer l
    "uniform": lambda l: 1.0,
    "l": lambda l: float(l),
    "sum_l": lambda l: l * (l + 1) / 2,
    "sqrt_l": lambda l: math.sqrt(l),
    "inv_l": lambda l: 1.0 / l,
    "inv_sqrt_l": lambda l: 1.0 / math.sqrt(l),
}
GRADUAL_FRACTION = 0.5  # the gradual curriculum has enabled every layer at this fraction of training
LAYER_DROPOUT_SCALES = {  # D(x), x = (l - 1) / (L - 1) in [0, 1]
    "exp": lambda x: math.exp(math.log(2) * x) - 1,
    "linear": lambda x: x,
    "uniform": lambda x: 1.0,
}


def layerskip_weights(layers: Sequence[int], num_layers: int, scale: float, scale_type: str) -> List[float]:
    """w_l for the enabled layers: e s(l) (s(L) for the last), normalised to sum to 1."""
    s = LAYERSKIP_SCALES[scale_type]
    raw = [s(l) * (scale if l < num_layers else 1.0) for l in layers]
    return [r / sum(raw) for r in raw]


def curriculum_layers(curriculum: str, num_layers: int, step: int = 0, total_steps: Optional[int] = None,
                      rotation: Optional[int] = None) -> List[int]:
    """E(t): the layers (1..L, ascending) whose early-exit loss counts at training step t; L always."""
    L = num_layers
    if curriculum == "none":
        enabled = range(1, L + 1)
    elif curriculum == "rotational":
        enabled = [l for l in range(1, L + 1) if ((l - 1 - step) % L) % rotation == 0]
    elif curriculum == "gradual":
        enabled = [l for l in range(1, L + 1) if step / total_steps >= GRADUAL_FRACTION * (L - l + 1) / L]
    else:
        raise ValueError(f"early_exit_curriculum={curriculum!r} is unknown.")
    return sorted(set(enabled) | {L})


def layer_dropout_rates(num_layers: int, p_max: float, scale: str = "exp") -> List[float]:
    """p_l = p_max D((l - 1) / (L - 1)) for l = 1..L."""
    D = LAYER_DROPOUT_SCALES[scale]
    if num_layers == 1:
        return [p_max]
    return [p_max * D((l - 1) / (num_layers - 1)) for l in range(1, num_layers + 1)]


def drop_samples(block_input: torch.Tensor, block_output: torch.Tensor, rate: float) -> torch.Tensor:
    """Each sample (dim 0) keeps the block's output with probability 1 - rate, else its input."""
    keep = torch.rand(block_input.shape[0], device=block_input.device) >= rate
    return torch.where(keep.view(-1, *[1] * (block_input.dim() - 1)), block_output, block_input)


# ----- the model --------------------------------------------------------------------------------
class EarlyExitTrainingMixin:
    """The training `loss` with the intermediate layers chosen by the config's flags. Put it (or an
    architecture's subclass of it, which defines the `_exit_*` methods) before the HF class:
    `super().forward` is the HF model's own."""

    # our loss is a mean per token: the Trainer must scale it for gradient accumulation itself
    accepts_loss_kwargs = False
    # LoRA's defaults for this architecture (peft's task type, the modules that get adapters)
    lora_task_type = "SEQ_2_SEQ_LM"
    default_lora_targets = ("q", "v")

    # ----- what an architecture provides ---------------------------------------------------------
    def _exit_num_layers(self) -> int:
        """L, the number of decoder blocks."""
        raise NotImplementedError

    def _exit_hidden_states(self, out) -> Sequence[torch.Tensor]:
        """HF's hidden states of the decoder: index l is block l's raw output for 1 <= l < L;
        index L is norm(h_L) (n_L as FREE takes it)."""
        raise NotImplementedError

    def _exit_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """z(h): the model's final norm and LM head on a raw block output."""
        raise NotImplementedError

    def _exit_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """norm(h): the decoder's final norm (what the meta head reads)."""
        raise NotImplementedError

    def _exit_state_dropout(self, normed: torch.Tensor) -> torch.Tensor:
        """A dropout the decoder applies after its final norm (T5); none by default."""
        return normed

    def _exit_blocks(self) -> nn.ModuleList:
        """The decoder blocks, 1..L."""
        raise NotImplementedError

    def _exit_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels aligned with the logits: as given (encoder-decoders)."""
        return labels

    def _exit_outputs(self, out, targets: torch.Tensor):
        """(outputs, targets) the token-mean losses read: every position by default."""
        return out, targets

    # ----- shared ----------------------------------------------------------------------------------
    def __init__(self, config):
        super().__init__(config)
        if uses_meta_head(config):
            self.cm_head = build_meta_head(config.hidden_size)
        if getattr(config, "do_layer_transformation", False):
            self.layer_transformation = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
            with torch.no_grad():
                self.layer_transformation.weight.copy_(torch.eye(config.hidden_size))
        self._uniform_teacher = torch.Generator().manual_seed(UNIFORM_TEACHER_SEED)
        self._training_progress = None  # (step, total steps) for a LayerSkip curriculum
        p_max = getattr(config, "layer_dropout_max", None)
        if p_max:
            rates = layer_dropout_rates(self._exit_num_layers(), p_max, layer_dropout_scale(config))
            for block, rate in zip(self._exit_blocks(), rates):
                # prepended: HF's own hooks that record hidden states must see the dropped output
                block.register_forward_hook(self._layer_dropout_hook(rate), with_kwargs=True, prepend=True)

    def _layer_dropout_hook(self, rate: float):
        def hook(block, args, kwargs, output):
            if not self.training or rate == 0:
                return output
            block_input = args[0] if args else kwargs["hidden_states"]
            if isinstance(output, tuple):
                return (drop_samples(block_input, output[0], rate),) + output[1:]
            return drop_samples(block_input, output, rate)
        return hook

    def _init_weights(self, module):
        # a T absent from the checkpoint starts as the identity (init.* skips loaded weights)
        if module is getattr(self, "layer_transformation", None):
            init.eye_(module.weight)
            return
        super()._init_weights(module)

    def training_args(self) -> AdditionalArguments:
        return AdditionalArguments.from_config(self.config)

    def set_training_progress(self, step: int, total_steps: Optional[int]) -> None:
        """The optimizer step t about to run and the total T, for LayerSkip's curriculum."""
        self._training_progress = (step, total_steps)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        args = self.training_args()
        wants_layers = labels is not None and (args.intermediate_loss_fn is not None or args.train_meta_cm_head)
        if not wants_layers:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        kwargs["output_hidden_states"] = True
        kwargs["return_dict"] = True
        targets = self._exit_targets(labels)
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
            out.loss = self._meta_loss(*self._exit_outputs(out, targets))
        else:
            out = super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
            # FREE's hidden-state distillation is a mean over every position: it reads them all
            read = (out, targets) if args.intermediate_loss_fn in KD_LOSSES else self._exit_outputs(out, targets)
            out.loss = self._intermediate_loss(args, *read)
        return out

    def _block_output(self, out, layer: int) -> torch.Tensor:
        return self._exit_hidden_states(out)[layer]

    def _layer_logits(self, out, layer: int) -> torch.Tensor:
        if layer == self._exit_num_layers():
            return out.logits  # the model's own head on h_L
        return self._exit_logits(self._block_output(out, layer))

    def _normed_state(self, out, layer: int) -> torch.Tensor:
        """n_l = dropout(norm(h_l)), FREE's decoder hidden state; HF's last one is already that."""
        if layer == self._exit_num_layers():
            return self._exit_hidden_states(out)[layer]
        return self._exit_state_dropout(self._exit_norm(self._block_output(out, layer)))

    def layerskip_layers(self, args: AdditionalArguments) -> List[int]:
        """E(t): every layer in eval mode, else the curriculum's at the step set_training_progress gave."""
        L = self._exit_num_layers()
        curriculum, _, _, rotation = early_exit_settings(args)
        if not self.training or curriculum == "none":
            return curriculum_layers("none", L)
        if self._training_progress is None or (curriculum == "gradual" and not self._training_progress[1]):
            raise ValueError(f"early_exit_curriculum={curriculum!r} needs the training step: add "
                             "CurriculumCallback() to the Trainer's callbacks, or call model.set_training_progress(step, "
                             "total_steps) before each step.")
        step, total = self._training_progress
        return curriculum_layers(curriculum, L, step, total, rotation)

    def _intermediate_loss(self, args: AdditionalArguments, out, labels: torch.Tensor) -> torch.Tensor:
        L = self._exit_num_layers()
        name = args.intermediate_loss_fn
        if name in ("ce", "weighted_ce"):
            logits = [self._layer_logits(out, layer) for layer in range(1, L + 1)]
            return ce_loss(logits, labels) if name == "ce" else weighted_ce_loss(logits, labels)
        if name == "layerskip":
            _, scale, scale_type, _ = early_exit_settings(args)
            layers = self.layerskip_layers(args)
            weights = layerskip_weights(layers, L, scale, scale_type)
            return sum(w * cross_entropy(self._layer_logits(out, l), labels) for w, l in zip(weights, layers))
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
            student = self._exit_logits(transform(self._block_output(out, k)))
        if name == "shallowdeep_kl_last":
            teachers = [last]
        else:
            with torch.no_grad():  # teachers only: no graph for the layers between k and L
                teachers = [self._layer_logits(out, layer) for layer in range(k + 1, L)]
            teachers.append(last)
        kd = kl_distillation(name, student, teachers, labels, self._uniform_teacher)
        return (1 - alpha) * loss + alpha * kd

    def _meta_loss(self, out, labels: torch.Tensor) -> torch.Tensor:
        L = self._exit_num_layers()
        # the backbone ran in eval mode: its heads without dropout, as at decoding
        logits = [self._exit_logits(self._block_output(out, layer)) for layer in range(1, L)] + [out.logits]
        states = [self._exit_norm(self._block_output(out, layer)) for layer in range(1, L)]
        loss, _ = meta_head_loss(self.cm_head, states, logits, labels)
        return loss


class CurriculumCallback(TrainerCallback):
    """Tells the model the step about to run and the total, for LayerSkip's curriculum."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under LoRA
        base.set_training_progress(state.global_step, state.max_steps)


# ----- LoRA, freezing, saving -----------------------------------------------------------------------
def linear_module_names(model: nn.Module) -> List[str]:
    """Last name parts of the model's linear layers (what `lora_target_modules` may name); GPT-2's
    are transformers' Conv1D (a linear layer with its weight transposed)."""
    return sorted({name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))})


def check_lora_targets(model: nn.Module, targets: List[str]) -> None:
    available = linear_module_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise ValueError(f"lora_target_modules: {', '.join(missing)} not found in the model; "
                         f"its linear layers are: {', '.join(available)}.")


def add_lora(model: nn.Module, args: AdditionalArguments):
    """Wrap the model with peft LoRA adapters (default targets: the architecture's attention query
    and value projections, `default_lora_targets`)."""
    from peft import LoraConfig, TaskType, get_peft_model

    targets = list(args.lora_target_modules or model.default_lora_targets)
    check_lora_targets(model, targets)
    extra = [name for name in ("cm_head", "layer_transformation") if getattr(model, name, None) is not None]
    # Conv1D keeps its weight as (in, out): peft must know, or it merges the adapters transposed
    transposed = any(isinstance(m, Conv1D) for name, m in model.named_modules() if name.split(".")[-1] in targets)
    config = LoraConfig(task_type=TaskType[model.lora_task_type], r=args.lora_rank, lora_alpha=args.lora_alpha,
                        lora_dropout=args.lora_dropout, target_modules=targets, modules_to_save=extra or None,
                        fan_in_fan_out=transposed)
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
        # the HF model's own forward (its plain loss), whichever class the model is
        out = super(EarlyExitTrainingMixin, model).forward(**batch, output_hidden_states=True, return_dict=True)
        out, targets = model._exit_outputs(out, model._exit_targets(batch["labels"]))
        L = model._exit_num_layers()
        return [float(cross_entropy(model._layer_logits(out, layer), targets)) for layer in range(1, L + 1)]
