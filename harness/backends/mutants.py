"""Mutant backends: the MLX reference with one injected porting bug each (`--backend mutant:NAME`).

They prove the harness's sensitivity: every mutant must fail, first at its expected stage. The list
covers DESIGN.md's porting bugs (the seed's four "before" failures, its silent fallback, its `model.`
key prefix, bias correction, eps, tied embeddings, padding) and others real ports have.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_parity.reference import loss as L
from mlx_parity.reference.config import ModelConfig
from mlx_parity.reference.model import Attention, Linear, LlamaForCausalLM
from mlx_parity.reference.schedule import make_schedule
from mlx_parity.reference.settings import TrainSettings
from mlx_parity.reference.trainer import Trainer, split_batch
from mlx_parity.reference.weights import LoadReport, load_weights, match, read_checkpoint

from .base import Ranks
from .mlx_backend import MLXBackend, MLXSession


# --- trainers with one bug each -----------------------------------------------------------------
class _LossBugs(Trainer):
    """The loss with its conventions as flags, so two loss bugs combine in one trainer."""

    shift, count_padding = True, False

    def _loss_from_logits(self, logits, batch):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.shift:
            logits, targets, mask = L.shifted_slices(logits, ids, mask)
        else:
            targets, mask = ids, mask.astype(mx.float32)
        ce = L.cross_entropy(logits, targets, mx.ones_like(mask) if self.count_padding else mask)
        d = L.distrust(batch["auth_weight"], batch["prov_entropy"], self.settings.loss.alpha)
        return ce + self.settings.loss.lam * d, ce, d


class NoShift(_LossBugs):
    """Each position is trained to predict its own token."""

    shift = False


class PaddingCounted(_LossBugs):
    """The cross-entropy averages over padding tokens too."""

    count_padding = True


class ForwardOnly(Trainer):
    """The seed's "before": forward pass only, no gradients, no update."""

    def gradients(self, batch):
        return self.loss(batch), {}

    def step(self, batch):
        return self.loss(batch)


class SilentFallback(Trainer):
    """The seed's fallback: gradients are computed, then the step returns the loss without updating."""

    def step(self, batch):
        parts, _ = self.accumulate(batch)
        return parts


class OptimizerDisconnected(Trainer):
    """The optimizer runs (moments, step counter) but its new parameters never reach the model."""

    def apply(self, grads):
        params = self.model.trainable_parameters()
        mx.eval(self.optimizer.apply_gradients(grads, params), self.optimizer.state)


class AccumulationSum(Trainer):
    """Micro-batch gradients summed instead of averaged."""

    def accumulate(self, batch):
        parts, grads = super().accumulate(batch)
        return parts, tree_map(lambda g: g * self.settings.accum_steps, grads)


class ClippingMissing(Trainer):
    def clip(self, grads):
        return grads


class CoupledWeightDecay(Trainer):
    """L2 added to the gradient (Adam) instead of decoupled decay (AdamW)."""

    def __init__(self, model, settings, lora_init=None):
        wd = settings.optimizer.weight_decay
        super().__init__(
            model,
            dataclasses.replace(settings, optimizer=dataclasses.replace(settings.optimizer, weight_decay=0.0)),
            lora_init,
        )
        self.settings, self._wd = settings, wd

    def apply(self, grads):
        params = dict(tree_flatten(self.model.trainable_parameters()))
        flat = {k: g + self._wd * params[k] for k, g in tree_flatten(grads)}
        super().apply(tree_unflatten(list(flat.items())))


class ScheduleOffByOne(Trainer):
    """The first update uses lr(1): the schedule is read after the step count grows."""

    def __init__(self, model, settings, lora_init=None):
        super().__init__(model, settings, lora_init)
        sched = make_schedule(settings.optimizer, settings.schedule)
        self.optimizer.learning_rate = sched(mx.array(1)) if callable(sched) else sched
        if callable(sched):
            self.optimizer._schedulers["learning_rate"] = lambda s: sched(s + 1)


# --- data-parallel bugs: each differs from the reference only on N > 1 ranks ------------------------
class DPGradientsSummed(Trainer):
    """Gradients all-summed across the ranks and never divided by the world size."""

    def _all_reduce(self, grads):
        return tree_map(lambda g: mx.distributed.all_sum(g, group=self.group), grads)


class DPGradientsNotReduced(Trainer):
    """No all-reduce: every rank steps with its own share's gradient, and the ranks drift apart."""

    def _all_reduce(self, grads):
        return grads


class DPClipPerRank(Trainer):
    """Each rank clips its own gradient by its own norm before the all-reduce; the mean is not clipped again."""

    def _all_reduce(self, grads):
        return super()._all_reduce(super().clip(grads))

    def clip(self, grads):
        return grads if self.group is not None else super().clip(grads)


class DPSameShard(Trainer):
    """Every rank reads rank 0's share of each micro-batch."""

    def _share(self, micro_batch):
        return split_batch(micro_batch, self.group.size(), "the world size")[0]


class DPTokenWeighted(Trainer):
    """Ranks weighted by their real (shifted) target tokens, not equally: Σ n_r g_r / Σ n_r."""

    def _share(self, micro_batch):
        share = super()._share(micro_batch)
        self._tokens = getattr(self, "_tokens", 0) + int(np.asarray(share["attention_mask"])[:, 1:].sum())
        return share

    def _all_reduce(self, grads):
        n, self._tokens = mx.array(float(self._tokens)), 0
        total = mx.distributed.all_sum(n, group=self.group)
        return tree_map(lambda g: mx.distributed.all_sum(g * n, group=self.group) / total, grads)


class DPStepPerRank(Trainer):
    """The step counter advanced once per rank: the schedule and bias correction read step N·t at update t."""

    def apply(self, grads):
        if self.group is not None:
            self.optimizer.state["step"] = self.optimizer.state["step"] + self.group.size() - 1
        super().apply(grads)


class _EpsInsideSqrt(optim.AdamW):
    """m̂ / sqrt(v̂ + eps): eps under the square root, where AdamW adds it after."""

    def apply_single(self, gradient, parameter, state):
        lr = self.learning_rate.astype(gradient.dtype)
        b1, b2 = self.betas
        parameter = parameter * (1 - lr * self.weight_decay)
        m = state["m"] = b1 * state["m"] + (1 - b1) * gradient
        v = state["v"] = b2 * state["v"] + (1 - b2) * mx.square(gradient)
        if self.bias_correction:
            m, v = m / (1 - b1**self.step), v / (1 - b2**self.step)
        return parameter - lr * m / mx.sqrt(v + self.eps)


class _OptimizerBugs(Trainer):
    """A trainer whose AdamW carries the `optimizer_bug` mixins of every class in its MRO, so two
    optimizer bugs combine in one optimizer."""

    def __init__(self, model, settings, lora_init=None):
        super().__init__(model, settings, lora_init)
        mixins = [c.__dict__["optimizer_bug"] for c in type(self).__mro__ if "optimizer_bug" in c.__dict__]
        mixins = tuple(sorted(mixins, key=lambda m: not getattr(m, "wraps", False)))  # those that call super() first
        o = settings.optimizer
        self.optimizer = type("AdamWWithBugs", mixins + (optim.AdamW,), {})(
            learning_rate=make_schedule(o, settings.schedule),
            betas=list(o.betas),
            eps=o.eps,
            weight_decay=o.weight_decay,
            bias_correction=o.bias_correction,
        )


class EpsInsideSqrt(_OptimizerBugs):
    """AdamW with eps inside the square root of the denominator."""

    optimizer_bug = _EpsInsideSqrt


class ClippingPerTensor(Trainer):
    """Each gradient tensor clipped to the norm on its own, where the reference clips the global norm."""

    def clip(self, grads):
        if self.settings.clip_norm is None:
            return grads
        c = self.settings.clip_norm
        return tree_map(lambda g: g * mx.minimum(1.0, c / (mx.sqrt(mx.sum(g * g)) + 1e-12)), grads)


class _FrozenBiasCorrection(optim.AdamW):
    wraps = True  # changes the step, then runs whatever update follows it

    def apply_single(self, gradient, parameter, state):
        step = self.state["step"]
        self.state["step"] = mx.array(1, mx.uint64)
        try:
            return super().apply_single(gradient, parameter, state)
        finally:
            self.state["step"] = step


class BiasCorrectionFrozen(_OptimizerBugs):
    """Bias correction always computed for t = 1: right at the first update, wrong after."""

    optimizer_bug = _FrozenBiasCorrection


class _TiledAttention(Attention):
    """Key/value heads expanded by tiling (h uses kv h % n_kv) instead of repeating (h // n_rep)."""

    def kv_for_queries(self, kv):
        return mx.tile(kv, (1, self.n_heads // self.n_kv, 1, 1))


class _ScaleOverD(Attention):
    """Attention logits scaled by 1/head_dim instead of 1/sqrt(head_dim)."""

    def scores(self, q, k):
        return (q / self.head_dim) @ self.kv_for_queries(k).transpose(0, 1, 3, 2)


class _AntiCausal(Attention):
    """The causal mask pointing the wrong way: query t sees keys t..T-1 (a transposed triangle)."""

    def probs(self, scores):
        T = scores.shape[-1]
        return mx.softmax(mx.where(mx.arange(T)[None, :] >= mx.arange(T)[:, None], scores, -mx.inf), axis=-1)


def _attention_class(cls):
    """Swap each layer's attention for `cls`, on top of any attention bug already injected."""

    def hook(model) -> None:
        for layer in model.model.layers:
            now = type(layer.self_attn)
            layer.self_attn.__class__ = (
                cls if now is Attention else type(f"{cls.__name__}{now.__name__}", (cls, now), {})
            )

    return hook


class _BiasUnused(Linear):
    """A projection that holds its checkpoint bias but never adds it."""

    def __call__(self, x):
        y = x @ self.weight.T
        if self.lora_scale is not None:
            y = y + self.lora_scale * ((x @ self.lora_a) @ self.lora_b)
        return y


def attention_bias_unused(model) -> None:
    for layer in model.model.layers:
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(layer.self_attn, proj).__class__ = _BiasUnused


def gelu_mlp(model) -> None:
    """The MLP's activation is GELU where the checkpoint's config says SiLU."""
    import mlx.nn as nn

    for layer in model.model.layers:
        layer.mlp.activation = lambda gate, up: nn.gelu(gate) * up


def traditional_rope(model) -> None:
    """RoPE rotating interleaved pairs (traditional=True) instead of halves, as HF's rotate_half does."""
    import mlx.nn as nn

    for layer in model.model.layers:
        a = layer.self_attn
        a.rope = nn.RoPE(a.head_dim, traditional=True, base=model.config.rope_theta)


# --- loaders with one bug each ------------------------------------------------------------------
def load_nothing(model, path, strict):
    """Weights never loaded: the model keeps its random initialisation, and nothing says so."""
    return LoadReport()


def load_with_prefix(model, path, strict):
    """Parameter names looked up as `model.` + name: `lm_head` never maps and keeps its initialisation."""
    params = dict(tree_flatten(model.parameters()))
    loaded, _ = match(params, read_checkpoint(path), model.config)
    loaded.pop("lm_head.weight", None)
    model.update(tree_unflatten(list(loaded.items())))
    return LoadReport()


def load_swapped(model, path, strict):
    """gate_proj and up_proj exchanged in the key map: each loads the other's checkpoint tensor."""
    swap = {"gate_proj": "up_proj", "up_proj": "gate_proj"}
    tensors = read_checkpoint(path)
    renamed = {}
    for k, v in tensors.items():
        parts = k.split(".")
        renamed[".".join(swap.get(p, p) for p in parts)] = v
    params = dict(tree_flatten(model.parameters()))
    loaded, _ = match(params, renamed, model.config)
    model.update(tree_unflatten(list(loaded.items())))
    return LoadReport()


def rope_offset_one(model) -> None:
    """RoPE applied at positions 1..T instead of 0..T-1 (an offset meant for a KV cache, left on)."""
    for layer in model.model.layers:
        a = layer.self_attn
        a.rope = lambda x, rope=a.rope: rope(x, offset=1)


def load_silently(model, path, strict):
    load_weights(model, path, strict=False)
    return LoadReport()


# --- the catalogue ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mutant:
    name: str
    description: str
    expected_stage: str
    fixtures: tuple[str, ...]  # where the bug is visible by construction
    expected_diagnosis: str  # the code harness/diagnosis.py must give
    trainer: type[Trainer] = Trainer
    config: Callable[[ModelConfig], ModelConfig] | None = None
    settings: Callable[[TrainSettings], TrainSettings] | None = None
    loader: Callable | None = None
    model_hook: Callable[[LlamaForCausalLM], None] | None = None  # changes the built model
    unshifted_targets: bool = False
    reset_optimizer_on_resume: bool = False
    world_size: int = 1  # the ranks it is audited on (`parity audit --world-size`): 2 for a data-parallel bug
    origin: str = ""  # where the bug comes from (seed, DESIGN.md)
    tags: tuple[str, ...] = field(default_factory=tuple)


def _opt(**changes):
    return lambda s: dataclasses.replace(s, optimizer=dataclasses.replace(s.optimizer, **changes))


MUTANTS = {
    m.name: m
    for m in [
        Mutant(
            "weights_not_loaded",
            "weights never loaded: random initialisation kept silently",
            "weight_mapping",
            ("gqa_padded", "mha_sharded", "bf16_full"),
            "weights_not_loaded",
            loader=load_nothing,
            origin="seed #1, DESIGN 1",
        ),
        Mutant(
            "key_prefix",
            "parameter names looked up with a `model.` prefix, so lm_head never maps",
            "weight_mapping",
            ("gqa_padded", "head"),
            "key_mapping",
            loader=load_with_prefix,
            origin="seed, DESIGN 5",
        ),
        Mutant(
            "tied_embeddings_ignored",
            "tie_word_embeddings ignored: a separate, random lm_head",
            "weight_mapping",
            ("tied", "qwen3"),
            "tied_embeddings_ignored",
            config=lambda c: dataclasses.replace(c, tie_word_embeddings=False),
            loader=load_silently,
            origin="DESIGN 8",
        ),
        Mutant(
            "rmsnorm_eps_hardcoded",
            "RMSNorm eps hard-coded to MLX's 1e-5 instead of the config's value",
            "forward",
            ("small_eps_bias", "gqa_single"),
            "rmsnorm_eps",
            config=lambda c: dataclasses.replace(c, rms_norm_eps=1e-5),
            origin="DESIGN 7",
        ),
        Mutant(
            "gqa_tiled_heads",
            "grouped-query kv heads tiled instead of repeated",
            "forward",
            ("gqa_padded", "gqa_single", "bf16_checkpoint", "bf16_lora"),
            "gqa_head_mapping",
            model_hook=_attention_class(_TiledAttention),
        ),
        Mutant(
            "rope_traditional",
            "RoPE on interleaved pairs (traditional) instead of rotated halves",
            "forward",
            ("gqa_padded", "bf16_full"),
            "rope_pairing",
            model_hook=traditional_rope,
        ),
        Mutant(
            "rope_scaling_ignored",
            "the config's RoPE scaling (Llama 3's llama3 type) ignored: plain rope_theta frequencies",
            "forward",
            ("llama3_rope",),
            "rope_scaling",
            config=lambda c: dataclasses.replace(c, rope_type="default", rope_scaling=()),
        ),
        Mutant(
            "rope_offset",
            "RoPE rotates position t as t + 1: invisible end to end (q·kᵀ depends on the difference of positions), "
            "a break of the protocol's contract that only the forward's pieces show",
            "isolated_forward",
            ("gqa_padded", "gqa_single", "bf16_lora"),
            "rope_position",
            model_hook=rope_offset_one,
        ),
        Mutant(
            "gate_up_swapped_keys",
            "gate_proj and up_proj load each other's checkpoint tensors",
            "weight_mapping",
            ("gqa_padded", "head"),
            "key_mapping",
            loader=load_swapped,
        ),
        Mutant(
            "attention_scale_wrong",
            "attention logits scaled by 1/head_dim instead of 1/sqrt(head_dim)",
            "forward",
            ("gqa_padded", "mha_sharded"),
            "attention_scale",
            model_hook=_attention_class(_ScaleOverD),
        ),
        Mutant(
            "causal_mask_flipped",
            "the causal mask points the wrong way: each token attends to the ones after it",
            "forward",
            ("gqa_padded", "tied", "bf16_lora"),
            "causal_mask",
            model_hook=_attention_class(_AntiCausal),
            origin="the seed's port (audited)",
        ),
        Mutant(
            "mlp_gelu",
            "the MLP uses GELU where the config's hidden_act is SiLU",
            "forward",
            ("gqa_padded", "head", "bf16_lora"),
            "mlp_activation",
            model_hook=gelu_mlp,
        ),
        Mutant(
            "qk_norm_ignored",
            "Qwen3's q_norm and k_norm never applied: read as Qwen2 and their checkpoint tensors skipped",
            "weight_mapping",
            ("qwen3",),
            "checkpoint_tensors_unused",
            config=lambda c: dataclasses.replace(c, qk_norm=False),
            loader=load_silently,
        ),
        Mutant(
            "attention_bias_ignored",
            "the checkpoint's q/k/v/o biases never applied (config.attention_bias ignored)",
            "forward",
            ("small_eps_bias",),
            "bias_missing",
            model_hook=attention_bias_unused,
        ),
        Mutant(
            "lora_scale_ignored",
            "LoRA scale ignored (1 instead of the configured 2)",
            "forward",
            ("lora", "bf16_lora"),
            "lora_scale",
            settings=lambda s: dataclasses.replace(s, lora=dataclasses.replace(s.lora, scale=1.0)),
        ),
        Mutant(
            "rope_theta_hardcoded",
            "RoPE base hard-coded to 10000 instead of the config's rope_theta (or read only where one "
            "transformers version writes it)",
            "forward",
            ("mha_sharded", "tied", "gqa_single", "qwen3"),
            "rope_base",
            config=lambda c: dataclasses.replace(c, rope_theta=10000.0),
        ),
        Mutant(
            "distrust_alpha_default",
            "distrust alpha hard-coded to the default 2.7",
            "loss",
            ("lora",),
            "distrust_alpha",
            settings=lambda s: dataclasses.replace(s, loss=dataclasses.replace(s.loss, alpha=2.7)),
        ),
        Mutant(
            "distrust_lambda_one",
            "distrust weight lambda hard-coded to 1",
            "loss",
            ("lora", "head"),
            "distrust_lambda",
            settings=lambda s: dataclasses.replace(s, loss=dataclasses.replace(s.loss, lam=1.0)),
        ),
        Mutant(
            "no_shift",
            "slices not shifted: each position predicts its own token",
            "shifted_slices",
            ("gqa_padded",),
            "labels_not_shifted",
            trainer=NoShift,
            unshifted_targets=True,
            origin="seed #2, DESIGN 2",
        ),
        Mutant(
            "padding_counted",
            "padding tokens counted in the cross-entropy",
            "loss",
            ("gqa_padded", "bf16_lora"),
            "padding_counted",
            trainer=PaddingCounted,
            origin="DESIGN 9",
        ),
        Mutant(
            "trains_head_only",
            "only lm_head and the final norm train where the reference trains everything (the seed's port)",
            "gradients",
            ("gqa_padded",),
            "trainable_set_mismatch",
            settings=lambda s: dataclasses.replace(s, trainable="head"),
        ),
        Mutant(
            "forward_only",
            "forward pass only: no gradients, no update",
            "gradients",
            ("gqa_padded", "head"),
            "no_gradients",
            trainer=ForwardOnly,
            origin="seed #3, DESIGN 3",
        ),
        Mutant(
            "silent_fallback",
            "gradients computed, then the loss returned without an update",
            "optimizer",
            ("gqa_padded", "bf16_full"),
            "no_update",
            trainer=SilentFallback,
            origin="seed's fallback, DESIGN 3",
        ),
        Mutant(
            "optimizer_disconnected",
            "optimizer state advances but parameters never change",
            "optimizer",
            ("gqa_padded", "lora", "bf16_lora", "bf16_full"),
            "optimizer_not_connected",
            trainer=OptimizerDisconnected,
            origin="seed #4, DESIGN 4",
        ),
        Mutant(
            "bias_correction_flipped",
            "AdamW bias correction on where the reference has it off, or off where on",
            "optimizer",
            ("gqa_padded", "mha_sharded", "bf16_lora"),
            "bias_correction",
            settings=lambda s: _opt(bias_correction=not s.optimizer.bias_correction)(s),
            origin="DESIGN 6",
        ),
        Mutant(
            "adam_eps_mismatch",
            "AdamW eps 1e-7 instead of 1e-8",
            "optimizer",
            ("gqa_padded",),
            "adam_eps",
            settings=_opt(eps=1e-7),
        ),
        Mutant(
            "adam_eps_inside_sqrt",
            "AdamW's eps under the square root: m̂/sqrt(v̂ + eps)",
            "optimizer",
            ("gqa_padded",),
            "adam_eps_placement",
            trainer=EpsInsideSqrt,
        ),
        Mutant(
            "clipping_per_tensor",
            "each gradient tensor clipped on its own instead of the global norm",
            "optimizer",
            ("clip_accum_warmup",),
            "clipping_per_tensor",
            trainer=ClippingPerTensor,
        ),
        Mutant(
            "weight_decay_missing",
            "weight decay not applied",
            "optimizer",
            ("small_eps_bias", "bf16_lora"),
            "weight_decay_missing",
            settings=_opt(weight_decay=0.0),
        ),
        Mutant(
            "weight_decay_coupled",
            "weight decay added to the gradient (Adam + L2) instead of decoupled",
            "optimizer",
            ("small_eps_bias", "bf16_full"),
            "weight_decay_coupled",
            trainer=CoupledWeightDecay,
        ),
        Mutant(
            "schedule_off_by_one",
            "learning-rate schedule read one step late (first update uses lr(1))",
            "optimizer",
            ("clip_accum_warmup",),
            "schedule_off_by_one",
            trainer=ScheduleOffByOne,
        ),
        Mutant(
            "clipping_missing",
            "global-norm clipping not applied",
            "optimizer",
            ("clip_accum_warmup", "bf16_full"),
            "clipping_missing",
            trainer=ClippingMissing,
        ),
        Mutant(
            "accumulation_sum",
            "accumulated gradients summed, not averaged",
            "optimizer",
            ("accum_head",),
            "accumulation_scaling",
            trainer=AccumulationSum,
        ),
        Mutant(
            "bias_correction_frozen",
            "bias correction computed for t = 1 at every step",
            "trajectory",
            ("gqa_padded", "bf16_lora"),
            "bias_correction_step",
            trainer=BiasCorrectionFrozen,
        ),
        Mutant(
            "float32_where_bfloat16",
            "float32 parameters and forward where the settings train in bfloat16",
            "weight_mapping",
            ("bf16_full",),
            "precision_mismatch",
            settings=lambda s: dataclasses.replace(s, precision="float32"),
        ),
        Mutant(
            "dp_gradients_summed",
            "data parallel: gradients all-summed across the ranks, not averaged",
            "data_parallel",
            ("gqa_padded", "lora"),
            "dp_gradients_summed",
            trainer=DPGradientsSummed,
            world_size=2,
            origin="issue 22",
        ),
        Mutant(
            "dp_gradients_not_reduced",
            "data parallel: no all-reduce, each rank steps on its own share",
            "data_parallel",
            ("gqa_padded", "lora"),
            "dp_gradients_not_reduced",
            trainer=DPGradientsNotReduced,
            world_size=2,
            origin="issue 22",
        ),
        Mutant(
            "dp_clip_per_rank",
            "data parallel: each rank clips by its own gradient norm before the all-reduce",
            "data_parallel",
            ("clip_accum_warmup",),
            "dp_clip_per_rank",
            trainer=DPClipPerRank,
            world_size=2,
            origin="issue 22",
        ),
        Mutant(
            "dp_same_shard",
            "data parallel: every rank reads rank 0's share of the batch",
            "data_parallel",
            ("gqa_padded", "lora"),
            "dp_same_shard",
            trainer=DPSameShard,
            world_size=2,
            origin="issue 22",
        ),
        Mutant(
            "dp_token_weighted",
            "data parallel: ranks weighted by their real tokens instead of equally",
            "data_parallel",
            ("gqa_padded",),
            "dp_token_weighted",
            trainer=DPTokenWeighted,
            world_size=2,
            origin="issue 22",
        ),
        Mutant(
            "dp_step_per_rank",
            "data parallel: the optimizer's step counter advanced once per rank",
            "data_parallel",
            ("gqa_padded", "lora"),
            "dp_step_per_rank",
            trainer=DPStepPerRank,
            world_size=2,
            origin="issue 22",
        ),
        Mutant(
            "resume_loses_optimizer_state",
            "a resumed run starts with fresh AdamW moments and step",
            "checkpoint",
            ("gqa_padded", "trajectory_long", "bf16_full"),
            "resume_state_lost",
            reset_optimizer_on_resume=True,
        ),
    ]
}


def combine(names: tuple[str, ...]) -> Mutant:
    """Several bugs in one port: configs, settings and model hooks applied in turn, the trainers' overrides
    joined in one class (each overrides other methods or other flags), at most one loader."""
    ms = [MUTANTS[n] for n in names]
    loaders = [m.loader for m in ms if m.loader]
    if len(loaders) > 1:
        raise ValueError(f"{' and '.join(m.name for m in ms if m.loader)} each replace the loader: a port has only one")
    trainers = tuple(dict.fromkeys(m.trainer for m in ms if m.trainer is not Trainer))

    def chain(fns):
        fns = [f for f in fns if f]
        if not fns:
            return None

        def run(x):
            for f in fns:
                x = f(x)
            return x

        return run

    def hooks(model):
        for m in ms:
            if m.model_hook:
                m.model_hook(model)

    return Mutant(
        "+".join(names),
        "; ".join(m.description for m in ms),
        ms[0].expected_stage,
        (),
        ms[0].expected_diagnosis,
        trainer=type("Combined", trainers, {}) if len(trainers) > 1 else (trainers[0] if trainers else Trainer),
        config=chain([m.config for m in ms]),
        settings=chain([m.settings for m in ms]),
        loader=loaders[0] if loaders else None,
        model_hook=hooks if any(m.model_hook for m in ms) else None,
        unshifted_targets=any(m.unshifted_targets for m in ms),
        reset_optimizer_on_resume=any(m.reset_optimizer_on_resume for m in ms),
        world_size=max(m.world_size for m in ms),
    )


def build(mutant: Mutant, checkpoint: Path, settings: TrainSettings, lora_init: Path | None, strict: bool = True):
    """The mutant's trainer on `checkpoint` and its load report."""
    mx.random.seed(0)  # a mutant that keeps random weights keeps the same ones every run
    cfg = ModelConfig.from_file(checkpoint)
    cfg = mutant.config(cfg) if mutant.config else cfg
    model = LlamaForCausalLM(cfg)
    if mutant.model_hook:
        mutant.model_hook(model)
    report = (mutant.loader or load_weights)(model, checkpoint, strict)
    settings = mutant.settings(settings) if mutant.settings else settings
    lora = mx.load(str(lora_init)) if lora_init else None
    return mutant.trainer(model, settings, lora), report


class _UnshiftedSession(MLXSession):
    def shifted(self, input_ids, attention_mask):
        return np.asarray(input_ids, np.int32), np.asarray(attention_mask, np.float32)


class MutantBackend(MLXBackend):
    """The MLX reference with one bug of the catalogue injected."""

    def __init__(self, mutant: Mutant):
        self.mutant = mutant
        self.name = f"mutant:{mutant.name}"

    def _session(self, trainer, report):
        return (_UnshiftedSession if self.mutant.unshifted_targets else MLXSession)(trainer, report)

    @property
    def ranks(self) -> Ranks:
        """Its ranks behind the protocol: the protocol server's data-parallel rank (`MLXBackend.rank_outputs`)."""
        server = (sys.executable, "-m", "mlx_parity.harness.protocol.server", self.name)
        return Ranks("mlx", server, protocol=True)

    def open(self, case, strict: bool = True):
        trainer, report = build(self.mutant, case.checkpoint, case.settings, case.lora_init, strict)
        return self._session(trainer, report.to_dict())

    def resume(self, case, path: Path):
        trainer = self.mutant.trainer.load_checkpoint(
            path
        )  # the mutant's own __init__ (its optimizer), the saved state
        if self.mutant.model_hook:  # the saved config carries a mutated config; a hooked module is rebuilt plain
            self.mutant.model_hook(trainer.model)
        if self.mutant.reset_optimizer_on_resume:  # a fresh trainer around the loaded model: new moments and step
            trainer = self.mutant.trainer(trainer.model, trainer.settings)
        return self._session(trainer, {})
