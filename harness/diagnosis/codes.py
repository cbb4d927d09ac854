"""Every diagnosis code and its one-line meaning: the registry a report, a test or a reader looks up."""

CODES = {
    # weight_mapping
    "weights_not_loaded": "the model keeps its initialisation: no checkpoint tensor was loaded",
    "key_mapping": "parameter names and checkpoint keys do not map one to one (a prefix, a rename, a swap)",
    "parameters_not_in_checkpoint": "the port's model has parameters no checkpoint tensor fills (a bias the family lacks): they keep their initialisation",
    "nondeterministic_load": "two fresh loads of the same request differ: the port initialises parameters unseeded",
    "lora_adapters_missing": "the port has no LoRA adapters where the settings train them",
    "checkpoint_tensors_unused": "checkpoint tensors fill no parameter of the port: a module it leaves out (Qwen3's q/k norms, biases)",
    "tied_embeddings_ignored": "the config ties lm_head to embed_tokens, the port has a separate lm_head",
    "parameter_shape": "parameters have another shape than their checkpoint tensors (other dimensions, or transposed)",
    "precision_mismatch": "the port keeps float32 parameters where the settings train in bfloat16",
    # forward, end to end (localisation only) and piece by piece (causes solved from the numbers)
    "forward_divergence": "the forward pass diverges; the isolated forward check names the piece",
    "rmsnorm_eps": "an RMSNorm's eps, solved from its output, is not the config's rms_norm_eps",
    "layer_norm": "a LayerNorm (each row's mean subtracted) where the model has an RMSNorm",
    "norm_weight": "an RMSNorm output that the configured eps explains without its weight (weight unused or offset)",
    "bias_missing": "a projection's output lacks the checkpoint's bias",
    "weight_transposed": "a projection multiplies by the weight untransposed",
    "lora_scale": "the LoRA branch enters with another scale than alpha/rank",
    "rope_pairing": "RoPE rotates other pairs of dimensions than the reference (interleaved vs halves)",
    "rope_base": "RoPE's frequencies imply another base than the config's rope_theta",
    "rope_position": "RoPE's angles follow another position (an offset, or another axis)",
    "rope_scaling": "RoPE's frequencies are the unscaled ones where the config scales them (llama3, linear)",
    "rope_direction": "RoPE rotates the other way",
    "rope_dims": "RoPE rotates fewer dimensions than head_dim",
    "attention_scale": "attention logits carry another scale than 1/sqrt(head_dim)",
    "gqa_head_mapping": "query heads read other kv heads than h // (heads / kv_heads)",
    "causal_mask": "the attention mask lets a query see other keys than 0..t",
    "batch_rows_mixed": "a row's forward depends on another row of the batch (a reshape or repeat across the batch axis)",
    "position_blind": "attention ignores token order: RoPE does not rotate by position",
    "softmax_axis": "attention probabilities are normalised over the wrong axis",
    "attention_merge": "the heads' outputs are merged in another layout than [B, T, heads·head_dim]",
    "mlp_activation": "the MLP's activation is another function than SiLU",
    "gate_up_swapped": "the MLP applies the activation to up_proj instead of gate_proj",
    "embedding_scale": "token embeddings are scaled",
    "layer_wiring": "every piece of a layer agrees on the reference's inputs, the layer's own chain does not (residuals, order)",
    "piece_divergence": "one piece of the forward differs on the reference's inputs, and no solved convention explains it",
    # shifted_slices and loss
    "labels_not_shifted": "targets are the input tokens, not the next ones",
    "padding_counted": "padding positions count in the cross-entropy",
    "distrust_alpha": "the distrust term implies another alpha than configured",
    "distrust_lambda": "the total implies another lambda than configured",
    "distrust_term": "the distrust term differs and no alpha explains it",
    # gradients
    "no_gradients": "no gradients at all",
    "zero_gradients": "every gradient is exactly zero",
    "trainable_set_mismatch": "the port trains another set of parameters",
    "gradient_layout": "a gradient holds the reference's values transposed or reordered",
    "gradient_names": "gradients reported under another parameter's name",
    # optimizer
    "no_update": "parameters unchanged and no optimizer state: a silent fallback",
    "optimizer_not_connected": "the optimizer's state advances, the parameters do not change",
    "accumulation_scaling": "micro-batch gradients summed, not averaged",
    "clipping_missing": "the gradient was not clipped",
    "clipping_per_tensor": "each gradient tensor clipped to the norm on its own, not by the global norm",
    "adam_eps_placement": "AdamW's eps enters under the square root (sqrt(v̂ + eps)), not after it",
    "gradient_scale": "the gradient reaching the optimizer is uniformly scaled",
    "weight_decay_coupled": "weight decay added to the gradient (L2) instead of decoupled",
    "weight_decay_missing": "decoupled weight decay not applied",
    "bias_correction": "Adam's bias correction differs from the reference's convention",
    "bias_correction_step": "Adam's bias correction uses another step than the update's own",
    "schedule_off_by_one": "the learning-rate schedule is read one step late",
    "learning_rate": "the update is uniformly scaled: another learning rate",
    "adam_eps": "the update implies another AdamW eps",
    # trajectory and checkpoint
    "trajectory_divergence": "a difference that appears only after the first update",
    "resume_state_lost": "a resumed run differs from the same port's uninterrupted run",
    # data_parallel: causes re-computed from every shard's gradient, named when one reproduces each rank's update
    "dp_gradients_summed": "gradients all-summed across the ranks and not divided by the world size",
    "dp_gradients_not_reduced": "each rank steps on its own share's gradient: no all-reduce, and the ranks drift apart",
    "dp_clip_per_rank": "each rank clips by its own gradient norm before the all-reduce, not by the global norm after it",
    "dp_same_shard": "every rank trains on the same share of the batch (rank 0's)",
    "dp_token_weighted": "ranks weighted by their real tokens where the contract averages them equally",
    "dp_step_per_rank": "the optimizer's step counter advances once per rank: bias correction and schedule read N·t",
    # no rule matched, or none could run
    "unexplained": "no known cause matched; the stage, tensor and size are reported",
    "error": "the stage failed without output",
    "stage_error": "the port raised an error in this stage",
    "diagnosis_failed": "a diagnosis rule raised; the failure stands, its cause is unknown",
}

# Codes that localise a failure without stating why: every other code names a cause.
LOCALISING = frozenset(
    {
        "forward_divergence",
        "piece_divergence",
        "layer_wiring",
        "trajectory_divergence",
        "unexplained",
        "error",
        "stage_error",
        "diagnosis_failed",
    }
)


# A cause and the less specific one a rule says where the numbers cannot tell its form apart (no bias correction
# and one frozen at t = 1 are the same update where (1−β1) = √(1−β2): diagnosis/isolated_schedule.py). For a port
# with the specific bug the general statement is true, not another cause.
GENERAL = {"bias_correction_step": "bias_correction"}


def states_a_cause(code: str) -> bool:
    return code in CODES and code not in LOCALISING


def true_of(code: str) -> set[str]:
    """The causes that are true of a port whose bug is `code`: itself and its less specific form."""
    return {code} | ({GENERAL[code]} if code in GENERAL else set())
