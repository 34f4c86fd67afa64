"""Every flag of the toolkit, and their validation.

`AdditionalArguments` keeps the names and defaults users know from FREE and the fork;
`update_autoconfig` copies them into a model config after checking them, so that a bad value
or combination fails with a clear `ValueError` before any model is loaded or any work starts.
"""

from dataclasses import dataclass, field, fields
from typing import List, Optional

# Confidence measures the decode loop understands. Contrastive ones are added by their issue.
CONFIDENCE_TYPES = (
    "softmax",
    "meta",
    "state",
    "contrastive_decoding",
    "reweight_contrastive_decoding",
    "JSD_contrastive_confidence",
)
# The lowest layer at which a measure is defined: contrastive ones need an amateur layer
# (floor(l/2) >= 1, or JSD candidates 2 <= j < l).
SMALLEST_CHECKED_LAYER = {
    "contrastive_decoding": 2,
    "reweight_contrastive_decoding": 2,
    "JSD_contrastive_confidence": 3,
}
VOCAB_REDUCTION_TYPES = ("fixed", "decaying", "adaptive")
INTERMEDIATE_LOSSES = (
    "ce",
    "weighted_ce",
    "shallowdeep_ce",
    "shallowdeep_kd_last",
    "shallowdeep_kd_unif",
    "shallowdeep_kd_dyna",
    "shallowdeep_kl_last",
    "shallowdeep_kl_unif",
    "shallowdeep_kl_dyna",
    "layerskip",
)
# LayerSkip's recipe (models.exit_training states the formulas); the first of each is the default
EARLY_EXIT_CURRICULA = ("none", "rotational", "gradual")
EARLY_EXIT_SCALE_TYPES = ("sum_l", "uniform", "l", "sqrt_l", "inv_l", "inv_sqrt_l")
LAYER_DROPOUT_SCALE_TYPES = ("exp", "linear", "uniform")


def _flag(default, help_text):
    return field(default=default, metadata={"help": help_text})


@dataclass
class AdditionalArguments:
    """Arguments for early-exit decoding of encoder-decoder models."""

    # deployment
    deploy_scenario: bool = _flag(False, "Evaluate with the early-exit decode loop, measuring speed (--per_device_eval_batch_size rows at once, 1 by default).")
    use_synchronize: bool = _flag(True, "Synchronise the accelerator around timed components (ignored on CPU, which needs none).")

    # training intermediate layers
    output_hidden_states_decoder: bool = _flag(False, "Output every decoder layer's hidden state, to train intermediate exits.")
    intermediate_loss_fn: Optional[str] = _flag(None, f"Loss on intermediate layers: one of {', '.join(INTERMEDIATE_LOSSES)}.")
    distill_layer_alpha: Optional[float] = _flag(None, "Weight of distillation, in [0, 1]: CE + alpha KD (shallowdeep_kd_*), (1 - alpha) CE + alpha KL (shallowdeep_kl_*).")
    do_layer_transformation: bool = _flag(False, "A learnt map T on the shallow decoder's (student) hidden states in the distillation term.")
    early_exit_loss_scale: Optional[float] = _flag(None, "layerskip: e, the factor on every layer's loss but the last's (> 0; 1.0 when unset).")
    early_exit_scale_type: Optional[str] = _flag(None, f"layerskip: the per-layer scale s(l), one of {', '.join(EARLY_EXIT_SCALE_TYPES)} (sum_l when unset).")
    early_exit_curriculum: Optional[str] = _flag(None, f"layerskip: which layers' losses count at each step, one of {', '.join(EARLY_EXIT_CURRICULA)} (none when unset).")
    early_exit_rotation_interval: Optional[int] = _flag(None, "layerskip's rotational curriculum: R, every R-th layer enabled, rotated by one layer per step (>= 1).")
    layer_dropout_max: Optional[float] = _flag(None, "LayerSkip's layer dropout: p_max, the rate of the last decoder block in [0, 1); rates rise with depth; training only.")
    layer_dropout_scale: Optional[str] = _flag(None, f"How layer dropout rises with depth: one of {', '.join(LAYER_DROPOUT_SCALE_TYPES)} (exp when unset).")

    # static exit
    static_exit_layer: Optional[int] = _flag(None, "Every token leaves after this decoder block (1..L).")

    # CALM-style early exit
    use_early_exit: bool = _flag(False, "Let each token exit at the first confident decoder layer.")
    exit_conf_type: Optional[str] = _flag(None, f"Confidence measure: one of {', '.join(CONFIDENCE_TYPES)}.")
    exit_conf_threshold: float = _flag(1.0, "A token exits when its confidence is above this value, in [0, 1]; 1 means never.")
    exit_position_temp: Optional[float] = _flag(None, "Temperature of the position-decaying threshold (>= 0); None keeps it constant.")
    exit_min_layer: Optional[int] = _flag(None, "First layer at which confidence is computed (1..L-1); None means 1.")
    train_meta_cm_head: bool = _flag(False, "Train the meta confidence head against agreement with the last layer.")

    # FREE shallow-deep
    use_shallow_deep: bool = _flag(False, "Use FREE's shallow-deep module with synchronised parallel decoding.")
    shallow_exit_layer: Optional[int] = _flag(None, "Number of blocks of the shallow decoder (1..L-1).")
    shallow2deep_conf_type: Optional[str] = _flag(None, "Confidence measure deciding between the shallow and the deep path.")
    shallow2deep_conf_threshold: float = _flag(1.0, "A token exits at the shallow layer when its confidence is above this value.")
    parallel_gen_token: bool = _flag(True, "Run skipped tokens through the deep layers in parallel with the next deep token.")
    copy_skipped_hidden_states: bool = _flag(False, "Fill skipped tokens' deep caches from copied shallow states instead.")
    rollback_conf_threshold: Optional[float] = _flag(None, "Cross-entropy above which a shallow token is replaced by the deep one.")
    parallel_causal_mask: bool = _flag(True, "Use a causal mask in the parallel deep pass.")
    use_adapt_threshold: bool = _flag(False, "Estimate the shallow threshold on the fly with a Beta mixture.")
    adapt_threshold_level: float = _flag(0.4, "zeta: a grid point passes when the likelihood ratio of the shallow-agrees component is above it, in (0, 1) (FREE: 0.4).")
    adapt_threshold_samples: int = _flag(300, "The adaptive threshold is refitted after each of this many first samples.")
    use_self_speculation: bool = _flag(False, "Verify the shallow layer's tokens with one deep pass: output identical to the full model.")
    max_draft_tokens: int = _flag(2, "Self-speculation: a verification pass is forced after this many drafted tokens (>= 1).")
    draft_vocab_size: Optional[int] = _flag(None, "Self-speculation: draft from this many rows of the head, the top "
                                                  "of the row's latest full-head scores (greedy, softmax; None: the full head).")

    # LoRA
    use_lora: bool = _flag(False, "Fine-tune with low-rank adapters (peft).")
    lora_rank: int = _flag(8, "Rank of the LoRA adapters (> 0).")
    lora_alpha: float = _flag(8, "LoRA scaling alpha (> 0).")
    lora_dropout: float = _flag(0.1, "Dropout of the LoRA adapters, in [0, 1).")
    lora_target_modules: Optional[List[str]] = _flag(None, "Module names that receive adapters.")

    # the fork's additions
    type_vocab_reduct: Optional[str] = _flag(None, f"Reduce the LM head inside the decode loop: one of {', '.join(VOCAB_REDUCTION_TYPES)}.")
    vocab_k_max: int = _flag(35000, "k_max of the vocabulary-size schedule.")
    vocab_k_min: int = _flag(250, "k_min of the vocabulary-size schedule.")
    vocab_adaptive_scale: float = _flag(0.9, "beta of adaptive reduction, in (0, 1].")
    vocab_rerank: bool = _flag(False, "Progressive pruning: re-rank the retained tokens at each layer by that layer's scores.")
    cd_alpha: float = _flag(0.1, "Plausibility alpha of the contrastive measures, in (0, 1].")
    emit_contrastive_token: bool = _flag(False, "Emit the argmax of the contrastive distribution instead of the expert layer's.")
    plotting_logits: bool = _flag(False, "Record per-layer ranks, confidences and agreement, and plot them.")
    count_flops: bool = _flag(False, "Count FLOPs of blocks, confidence and encoder per generate call.")
    final_flops: bool = _flag(False, "The fork's name for count_flops (switches it on).")
    render_jsds: bool = _flag(False, "Record the discounted JSD of every candidate amateur layer per token.")

    def __post_init__(self):
        if self.final_flops:  # the fork's README calls FLOP counting --final_flops
            self.count_flops = True

    @classmethod
    def from_config(cls, config):
        """The flags a config carries, with the defaults for those it lacks."""
        defaults = cls()
        return cls(**{f.name: getattr(config, f.name, getattr(defaults, f.name)) for f in fields(cls)})


def _check_layer(name, value, low, high):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}={value!r} is outside the allowed layers {low}..{high} of this decoder.")


def _check_range(name, value, low, high, low_open=False, high_open=False):
    if value is None:
        return
    lo_ok = value > low if low_open else value >= low
    hi_ok = value < high if high_open else value <= high
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (lo_ok and hi_ok):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name}={value!r} must lie in {interval}.")


def _check_conf_type(name, value):
    if value not in CONFIDENCE_TYPES:
        raise ValueError(f"{name}={value!r} is unknown; allowed values: {', '.join(CONFIDENCE_TYPES)}.")


def _check_measure_layer(conf_name, conf_type, layer_name, layer):
    smallest = SMALLEST_CHECKED_LAYER.get(conf_type, 1)
    if (layer or 1) < smallest:
        raise ValueError(f"{conf_name}={conf_type!r} has no amateur layer below layer {smallest}: "
                         f"set {layer_name} to at least {smallest} (it is {layer}).")


def _check_intermediate_loss(args) -> None:
    """The flags each intermediate loss needs (issue 6)."""
    name = args.intermediate_loss_fn
    if name.startswith("shallowdeep") and args.shallow_exit_layer is None:
        raise ValueError(f"intermediate_loss_fn={name!r} needs shallow_exit_layer (1..L-1).")
    distils = name.startswith(("shallowdeep_kd", "shallowdeep_kl"))
    if distils and args.distill_layer_alpha is None:
        raise ValueError(f"intermediate_loss_fn={name!r} needs distill_layer_alpha in [0, 1].")
    if not distils and (args.distill_layer_alpha is not None or args.do_layer_transformation):
        raise ValueError(f"distill_layer_alpha and do_layer_transformation only act with a shallowdeep_kd_* or "
                         f"shallowdeep_kl_* intermediate_loss_fn, not {name!r}.")


def _check_layerskip(args) -> None:
    """LayerSkip's flags: their values, and none set where it would be ignored."""
    loss_flags = ("early_exit_loss_scale", "early_exit_scale_type", "early_exit_curriculum", "early_exit_rotation_interval")
    if args.intermediate_loss_fn != "layerskip":
        given = [name for name in loss_flags if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only act with intermediate_loss_fn='layerskip', "
                             f"not {args.intermediate_loss_fn!r}.")
    _check_range("early_exit_loss_scale", args.early_exit_loss_scale, 0, float("inf"), low_open=True)
    for name, allowed in (("early_exit_scale_type", EARLY_EXIT_SCALE_TYPES),
                          ("early_exit_curriculum", EARLY_EXIT_CURRICULA),
                          ("layer_dropout_scale", LAYER_DROPOUT_SCALE_TYPES)):
        value = getattr(args, name)
        if value is not None and value not in allowed:
            raise ValueError(f"{name}={value!r} is unknown; allowed values: {', '.join(allowed)}.")
    rotation = args.early_exit_rotation_interval
    if rotation is not None and (isinstance(rotation, bool) or not isinstance(rotation, int) or rotation < 1):
        raise ValueError(f"early_exit_rotation_interval={rotation!r} must be a positive integer.")
    if args.early_exit_curriculum == "rotational" and rotation is None:
        raise ValueError("early_exit_curriculum='rotational' needs early_exit_rotation_interval (R >= 1: every "
                         "R-th layer's loss counts, rotated by one layer per step).")
    if rotation is not None and args.early_exit_curriculum != "rotational":
        raise ValueError(f"early_exit_rotation_interval only acts with early_exit_curriculum='rotational', "
                         f"not {args.early_exit_curriculum!r}.")
    _check_range("layer_dropout_max", args.layer_dropout_max, 0, 1, high_open=True)
    if args.layer_dropout_scale is not None and args.layer_dropout_max is None:
        raise ValueError("layer_dropout_scale only acts with layer_dropout_max.")
    if args.layer_dropout_max and args.train_meta_cm_head:
        raise ValueError("layer_dropout_max cannot be combined with train_meta_cm_head: the meta head trains on "
                         "the frozen model in eval mode, where no layer is dropped.")


def early_exit_settings(args):
    """(curriculum, e, scale type, R) of the layerskip loss, defaults filled in."""
    return (args.early_exit_curriculum or "none",
            1.0 if args.early_exit_loss_scale is None else args.early_exit_loss_scale,
            args.early_exit_scale_type or "sum_l",
            args.early_exit_rotation_interval)


def layer_dropout_scale(config) -> str:
    """D's type for layer dropout (a config or AdditionalArguments), exp when unset."""
    return getattr(config, "layer_dropout_scale", None) or "exp"


def decoder_layers(config) -> int:
    """L, the decoder's depth: T5's num_decoder_layers, a decoder-only model's num_hidden_layers."""
    layers = getattr(config, "num_decoder_layers", None)
    return config.num_hidden_layers if layers is None else layers


def validate_additional_args(args: AdditionalArguments, num_decoder_layers: int) -> None:
    """Raise ValueError, naming the flag(s), for any invalid value or combination."""
    L = num_decoder_layers
    _check_layer("static_exit_layer", args.static_exit_layer, 1, L)
    _check_layer("exit_min_layer", args.exit_min_layer, 1, L - 1)
    _check_layer("shallow_exit_layer", args.shallow_exit_layer, 1, L - 1)
    _check_range("exit_conf_threshold", args.exit_conf_threshold, 0, 1)
    _check_range("shallow2deep_conf_threshold", args.shallow2deep_conf_threshold, 0, 1)
    _check_range("exit_position_temp", args.exit_position_temp, 0, float("inf"))
    _check_range("rollback_conf_threshold", args.rollback_conf_threshold, 0, float("inf"))
    _check_range("distill_layer_alpha", args.distill_layer_alpha, 0, 1)
    _check_range("lora_dropout", args.lora_dropout, 0, 1, high_open=True)
    _check_range("lora_alpha", args.lora_alpha, 0, float("inf"), low_open=True)
    _check_range("vocab_adaptive_scale", args.vocab_adaptive_scale, 0, 1, low_open=True)
    _check_range("cd_alpha", args.cd_alpha, 0, 1, low_open=True)
    for name in ("lora_rank", "vocab_k_max", "vocab_k_min"):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive integer.")
    if args.vocab_k_min > args.vocab_k_max:
        raise ValueError(f"vocab_k_min={args.vocab_k_min} must not exceed vocab_k_max={args.vocab_k_max}.")

    if args.use_early_exit:
        if args.exit_conf_type is None:
            raise ValueError("use_early_exit needs exit_conf_type; allowed values: " + ", ".join(CONFIDENCE_TYPES) + ".")
        _check_conf_type("exit_conf_type", args.exit_conf_type)
        _check_measure_layer("exit_conf_type", args.exit_conf_type, "exit_min_layer", args.exit_min_layer)
        if args.use_shallow_deep:
            raise ValueError("use_early_exit and use_shallow_deep are exclusive: choose one exit policy.")
    elif args.exit_min_layer is not None or args.exit_position_temp is not None:
        raise ValueError("exit_min_layer and exit_position_temp only act with use_early_exit=True.")
    elif args.exit_conf_type is not None:
        raise ValueError(f"exit_conf_type={args.exit_conf_type!r} only acts with use_early_exit=True "
                         "(shallow-deep decoding reads shallow2deep_conf_type).")
    if args.static_exit_layer is not None and (args.use_early_exit or args.use_shallow_deep):
        raise ValueError("static_exit_layer cannot be combined with use_early_exit or use_shallow_deep.")
    if args.use_shallow_deep:
        if args.shallow_exit_layer is None:
            raise ValueError("use_shallow_deep needs shallow_exit_layer (1..L-1).")
        if args.shallow2deep_conf_type is None:
            raise ValueError("use_shallow_deep needs shallow2deep_conf_type.")
        _check_conf_type("shallow2deep_conf_type", args.shallow2deep_conf_type)
        _check_measure_layer("shallow2deep_conf_type", args.shallow2deep_conf_type, "shallow_exit_layer",
                             args.shallow_exit_layer)
    if not args.parallel_causal_mask and (args.copy_skipped_hidden_states or args.rollback_conf_threshold is not None):
        raise ValueError("parallel_causal_mask=False cannot be combined with copy_skipped_hidden_states or rollback_conf_threshold.")
    if args.rollback_conf_threshold is not None and args.copy_skipped_hidden_states:
        raise ValueError("rollback_conf_threshold cannot be combined with copy_skipped_hidden_states.")
    if (args.rollback_conf_threshold is not None or args.use_adapt_threshold) and not (
            args.use_shallow_deep and uses_parallel_decoding(args)):
        raise ValueError("rollback_conf_threshold and use_adapt_threshold need use_shallow_deep with parallel "
                         "decoding (parallel_gen_token=True, copy_skipped_hidden_states=False).")
    _check_self_speculation(args)
    _check_range("adapt_threshold_level", args.adapt_threshold_level, 0, 1, low_open=True, high_open=True)
    if isinstance(args.adapt_threshold_samples, bool) or not isinstance(args.adapt_threshold_samples, int) \
            or args.adapt_threshold_samples < 1:
        raise ValueError(f"adapt_threshold_samples={args.adapt_threshold_samples!r} must be a positive integer.")
    if args.intermediate_loss_fn is not None:
        if args.intermediate_loss_fn not in INTERMEDIATE_LOSSES:
            raise ValueError(f"intermediate_loss_fn={args.intermediate_loss_fn!r} is unknown; allowed values: {', '.join(INTERMEDIATE_LOSSES)}.")
        if not args.output_hidden_states_decoder:
            raise ValueError("intermediate_loss_fn needs output_hidden_states_decoder=True.")
        _check_intermediate_loss(args)
    elif args.distill_layer_alpha is not None or args.do_layer_transformation:
        raise ValueError("distill_layer_alpha and do_layer_transformation only act with a shallowdeep_kd_* or "
                         "shallowdeep_kl_* intermediate_loss_fn.")
    _check_layerskip(args)
    if args.train_meta_cm_head:
        if not args.output_hidden_states_decoder:
            raise ValueError("train_meta_cm_head needs output_hidden_states_decoder=True.")
        if args.intermediate_loss_fn is not None:
            raise ValueError("train_meta_cm_head trains the meta head alone: leave intermediate_loss_fn unset.")
    if args.type_vocab_reduct is not None:
        if args.type_vocab_reduct not in VOCAB_REDUCTION_TYPES:
            raise ValueError(f"type_vocab_reduct={args.type_vocab_reduct!r} is unknown; allowed values: {', '.join(VOCAB_REDUCTION_TYPES)}.")
        if args.use_shallow_deep:
            # shallow-deep checks one layer, k, which is also the start layer: its head is the full one
            raise ValueError("type_vocab_reduct has no effect with use_shallow_deep: its only check, at "
                             "shallow_exit_layer, is the start layer, where the full head is computed.")
        if not args.use_early_exit:
            raise ValueError("type_vocab_reduct needs early exit: set use_early_exit.")
    active = active_conf_type(args)
    if args.render_jsds and active != "JSD_contrastive_confidence":
        raise ValueError(f"render_jsds records the JSD measure, but the active confidence measure is {active!r}: "
                         "set exit_conf_type (with use_early_exit) or shallow2deep_conf_type (with use_shallow_deep) "
                         "to JSD_contrastive_confidence.")
    if args.use_adapt_threshold and args.plotting_logits:
        raise ValueError("use_adapt_threshold cannot be combined with plotting_logits: traces run every layer of "
                         "every token, so no shallow exit and no deep pass labels the estimator.")
    if args.vocab_rerank and active_conf_type(args) in ("meta", "state"):
        raise ValueError(f"vocab_rerank re-orders the retained set by each layer's scores, which the "
                         f"{active_conf_type(args)!r} measure never computes: use softmax or a contrastive measure.")
    if args.vocab_rerank and args.type_vocab_reduct is None:
        raise ValueError("vocab_rerank re-ranks a reduced vocabulary: set type_vocab_reduct too.")
    if args.emit_contrastive_token and active not in SMALLEST_CHECKED_LAYER:
        raise ValueError(f"emit_contrastive_token needs a contrastive measure as the active one (exit_conf_type with "
                         f"use_early_exit, or shallow2deep_conf_type with use_shallow_deep); it is {active!r}.")


def active_conf_type(args) -> Optional[str]:
    """The confidence measure the decoder will compute: exit_conf_type under early exit,
    shallow2deep_conf_type under shallow-deep, None otherwise."""
    if args.use_early_exit:
        return args.exit_conf_type
    if args.use_shallow_deep:
        return args.shallow2deep_conf_type
    return None


def uses_meta_head(config) -> bool:
    """Whether a model with these flags (a config or AdditionalArguments) carries the meta head:
    the one rule both the training and the deploy model build it by."""
    return (
        getattr(config, "exit_conf_type", None) == "meta"
        or getattr(config, "shallow2deep_conf_type", None) == "meta"
        or bool(getattr(config, "train_meta_cm_head", False))
    )


def _check_self_speculation(args) -> None:
    """Self-speculation verifies with FREE's causal parallel pass, and every emitted token must
    be the full model's: nothing may accept a token the deep layers did not check."""
    value = args.max_draft_tokens
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_draft_tokens={value!r} must be a positive integer.")
    size = args.draft_vocab_size
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 2:
            raise ValueError(f"draft_vocab_size={size!r} must be an integer >= 2 (a confidence needs two scores).")
        if not args.use_self_speculation:
            raise ValueError("draft_vocab_size acts only with use_self_speculation=True.")
        if args.shallow2deep_conf_type != "softmax" or args.type_vocab_reduct is not None:
            raise ValueError("draft_vocab_size drafts by the softmax confidence over its own retained rows: it needs "
                             "shallow2deep_conf_type='softmax' and no type_vocab_reduct.")
    if not args.use_self_speculation:
        return
    if not (args.use_shallow_deep and uses_parallel_decoding(args)):
        raise ValueError("use_self_speculation needs use_shallow_deep with parallel decoding "
                         "(parallel_gen_token=True, copy_skipped_hidden_states=False).")
    conflicts = [name for name, on in (("rollback_conf_threshold", args.rollback_conf_threshold is not None),
                                       ("use_adapt_threshold", args.use_adapt_threshold),
                                       ("parallel_causal_mask=False", not args.parallel_causal_mask),
                                       ("render_jsds", args.render_jsds),
                                       ("plotting_logits", args.plotting_logits)) if on]
    if conflicts:
        raise ValueError(f"use_self_speculation cannot be combined with {', '.join(conflicts)}: it verifies every "
                         f"drafted token with the causal deep pass instead.")


def uses_parallel_decoding(args) -> bool:
    """FREE fills skipped tokens' deep states by a parallel pass, unless told to copy them."""
    return args.parallel_gen_token and not args.copy_skipped_hidden_states


def decoder_layers(config) -> int:
    """L: the decoder's blocks (T5's decoder, or a decoder-only model's layers)."""
    layers = getattr(config, "num_decoder_layers", None)
    return layers if layers is not None else config.num_hidden_layers


# Flags that act in training only: a checkpoint's config keeps the values it was trained with.
TRAINING_FLAGS = ("output_hidden_states_decoder", "intermediate_loss_fn", "distill_layer_alpha",
                  "do_layer_transformation", "train_meta_cm_head", "use_lora")


def normalise_saved_flags(config) -> List[str]:
    """Make a loaded checkpoint's config decodable; return what was ignored ("flag=value").

    A config saved by training carries its training flags (FREE saves a meta-head checkpoint with
    exit_conf_type='meta' and use_early_exit=False), which decoding does not read but validation
    refuses. Only when the saved flags fail validation: training flags go back to their defaults,
    and a confidence measure without its exit policy is cleared. Flags a user gives
    (update_autoconfig, generate's exit_args) are still validated strictly."""
    args = AdditionalArguments.from_config(config)
    try:
        validate_additional_args(args, decoder_layers(config))
        return []
    except ValueError:
        pass
    defaults, ignored = AdditionalArguments(), []
    inert = list(TRAINING_FLAGS)
    if not args.use_early_exit:
        inert.append("exit_conf_type")
    if not args.use_shallow_deep:
        inert.append("shallow2deep_conf_type")
    for name in inert:
        if getattr(args, name) != getattr(defaults, name):
            ignored.append(f"{name}={getattr(args, name)!r}")
            setattr(args, name, getattr(defaults, name))
    validate_additional_args(args, decoder_layers(config))  # anything else is a real inconsistency
    for name in inert:
        setattr(config, name, getattr(args, name))
    return ignored


def update_autoconfig(config, additional_args: AdditionalArguments, **kwargs):
    """Validate the flags against the model's depth and copy them, and kwargs, into `config`."""
    validate_additional_args(additional_args, decoder_layers(config))
    for f in fields(AdditionalArguments):
        setattr(config, f.name, getattr(additional_args, f.name))
    for key, value in kwargs.items():
        setattr(config, key, value)
    return config
