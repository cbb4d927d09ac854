"""The port's first divergent decoder layer, re-computed from what any port returns: its own input to that
layer (its residual after the layer before, or its embedding of the tokens), its own loaded weights
(`weights.*`, under whatever names the port gives them), and its output (`forward.hidden.<i>`).

The layer is re-computed in float64 under every combination of the conventions a port can get wrong
(`_choices`: RMSNorm eps, attention biases, RoPE axis, pairing, scaling and base, the kv-head map, the
mask, the attention scale, the activation, the LoRA scale), fewest deviations first;
a combination explains the layer when it reproduces the port's own change to the residual. A convention
is named only when every combination that reproduces the layer agrees on it and it is not the
reference's: several at once are found together, an ambiguous one is not named, and a layer nothing
reproduces is left localised. This needs no isolated request: it explains ports that answer only the
eight stages.
"""

from __future__ import annotations

import itertools
import re

import numpy as np
from safetensors.numpy import load_file

from mlx_parity.reference.config import ModelConfig

from .core import ACTIVATIONS, Diagnosis, f64, rms_norm, rotated

# Relative residual of the layer's change to the residual stream under which a combination reproduces
# it: a float32 port's own rounding sits at ~1e-6 of it, a single wrong convention at 1e-3 and beyond.
FIT = {"float32": 1e-4, "bfloat16": 8 * 2.0**-8}
# At most this many conventions wrong at once are searched (every combination up to it).
MAX_DEVIATIONS = 4


def _choices(cfg: ModelConfig, hidden: int, biases: bool, lora: bool) -> dict[str, tuple]:
    """Each convention's candidates, the reference's first."""
    D = cfg.head_dim
    return {
        "eps": tuple(dict.fromkeys((cfg.rms_norm_eps, 1e-5, 1e-6))),
        "attention_bias": ("added", "ignored") if biases else ("added",),
        "rope_axis": ("positions", "heads"),
        "rope_pairing": ("halves", "interleaved"),
        "rope_frequencies": ("configured", "unscaled") if cfg.rope_type != "default" else ("configured",),
        "rope_base": tuple(dict.fromkeys((cfg.rope_theta, 10000.0))),
        "kv_map": ("repeat", "tile", "flat"),
        "mask": ("causal", "transposed", "none"),
        "scale": tuple(dict.fromkeys((D**-0.5, (hidden // cfg.num_attention_heads) ** -0.5, 1.0 / D, 1.0))),
        "activation": ("silu", "gelu", "gelu_tanh", "relu"),
        "lora_scale": ("configured", "ignored") if lora else ("configured",),
    }


CODES = {  # the diagnosis code of each convention, and how to say the port's choice
    "eps": ("rmsnorm_eps", lambda v, ref: f"RMSNorm uses eps = {v:g}, not the config's rms_norm_eps = {ref:g}"),
    "rope_axis": (
        "rope_position",
        lambda v, ref: "RoPE rotates by the head index, not the position: applied along the head axis",
    ),
    "rope_pairing": ("rope_pairing", lambda v, ref: "RoPE rotates interleaved pairs (2i, 2i+1), not halves"),
    "rope_frequencies": ("rope_scaling", lambda v, ref: "RoPE uses rope_theta's unscaled frequencies"),
    "kv_map": (
        "gqa_head_mapping",
        lambda v, ref: {
            "tile": "query head h reads kv head h % kv_heads (tiled), not h // (heads / kv_heads)",
            "flat": "kv heads are repeated across the batch (a flat concatenation), not per group within each row",
        }[v],
    ),
    "mask": (
        "causal_mask",
        lambda v, ref: {
            "transposed": "query t sees keys t..T-1 (the causal triangle transposed), not keys 0..t",
            "none": "query t sees every key (no causal mask)",
        }[v],
    ),
    "attention_bias": (
        "bias_missing",
        lambda v, ref: "the attention projections' biases (loaded) are not added",
    ),
    "rope_base": ("rope_base", lambda v, ref: f"RoPE uses base {v:g}, not the config's rope_theta = {ref:g}"),
    "activation": ("mlp_activation", lambda v, ref: f"the MLP's activation is {v}, not {ref}"),
    "lora_scale": ("lora_scale", lambda v, ref: "the LoRA branch enters unscaled (scale 1), not at alpha/rank"),
    "scale": (
        "attention_scale",
        lambda v, ref: f"attention logits are scaled by {v:.4g}, not 1/sqrt(head_dim) = {ref:.4g}",
    ),
}


def _param(weights: dict, layer: int, suffix: str) -> np.ndarray | None:
    """The port's own tensor for one parameter of a layer, whatever it calls the module around it."""
    pattern = re.compile(rf"^weights\.(.+\.)?layers\.{layer}\.(.+\.)?{re.escape(suffix)}$")
    hits = [k for k in weights if pattern.match(k)]
    return f64(weights[hits[0]]) if len(hits) == 1 else None


def _linear(x, w, b):
    y = x @ w.T
    return y if b is None else y + b


def _rope(x, freqs, axis: str, pairing: str):
    """x [B, H, T, D] rotated at positions 0..T-1 (or at the head index, along the head axis)."""
    _, H, T, _ = x.shape
    pos = np.arange(T)[None, :, None] if axis == "positions" else np.arange(H)[:, None, None]
    return rotated(x, pairing == "halves", pos * freqs)


def _kv(kv, n_rep: int, how: str):
    if n_rep == 1:
        return kv
    if how == "repeat":
        return np.repeat(kv, n_rep, axis=1)
    if how == "tile":
        return np.tile(kv, (1, n_rep, 1, 1))
    B, K, T, D = kv.shape
    return np.concatenate([kv.ravel()] * n_rep).reshape(B, K * n_rep, T, D)


class _Layer:
    """One decoder layer on the port's own input and weights (and the case's LoRA adapters); each partial
    result is cached by the conventions it depends on, so trying many combinations recomputes little."""

    def __init__(self, cfg: ModelConfig, weights: dict, layer: int, lora: dict, lora_scale: float):
        self.cfg, self.p, self.lora, self.lora_scale, self.cache = cfg, {}, {}, lora_scale, {}
        for name in (
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "q_norm.weight",
            "k_norm.weight",
            *(f"{m}_proj.{kind}" for m in ("q", "k", "v", "o", "gate", "up", "down") for kind in ("weight", "bias")),
        ):
            self.p[name] = _param(weights, layer, name)
        for m in ("q", "k", "v", "o", "gate", "up", "down"):
            a, b = _param(lora, layer, f"{m}_proj.lora_a"), _param(lora, layer, f"{m}_proj.lora_b")
            if a is not None and b is not None:
                self.lora[m] = (a, b)

    def complete(self) -> bool:
        return all(self.p[f"{m}_proj.weight"] is not None for m in ("q", "k", "v", "o", "gate", "up", "down")) and all(
            self.p[n] is not None for n in ("input_layernorm.weight", "post_attention_layernorm.weight")
        )

    @property
    def has_attention_bias(self) -> bool:
        return any(self.p[f"{m}_proj.bias"] is not None for m in ("q", "k", "v", "o"))

    def _proj(self, x, m: str, bias: bool = True, lora_scale: float = 0.0):
        y = _linear(x, self.p[f"{m}_proj.weight"], self.p[f"{m}_proj.bias"] if bias else None)
        if m in self.lora:
            a, b = self.lora[m]
            y = y + lora_scale * ((x @ a) @ b)
        return y

    def _cached(self, key, make):
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def __call__(self, x, c: dict) -> np.ndarray:
        cfg = self.cfg
        B, T, _ = x.shape
        H, K = cfg.num_attention_heads, cfg.num_key_value_heads
        bias = c["attention_bias"] == "added"
        ls = self.lora_scale if c["lora_scale"] == "configured" else 1.0

        def heads(y, n):
            return y.reshape(B, T, n, -1).transpose(0, 2, 1, 3)

        def qkv():
            h = rms_norm(x, self.p["input_layernorm.weight"], c["eps"])
            q, k = heads(self._proj(h, "q", bias, ls), H), heads(self._proj(h, "k", bias, ls), K)
            if self.p["q_norm.weight"] is not None and self.p["k_norm.weight"] is not None:
                q, k = rms_norm(q, self.p["q_norm.weight"], c["eps"]), rms_norm(k, self.p["k_norm.weight"], c["eps"])
            return q, k, heads(self._proj(h, "v", bias, ls), K)

        q, k, v = self._cached(("qkv", c["eps"], bias, ls), qkv)
        D = q.shape[-1]

        def rotated():
            inv = c["rope_base"] ** (-np.arange(0, D, 2) / D)
            configured = (
                c["rope_frequencies"] == "configured" and cfg.head_dim == D and c["rope_base"] == cfg.rope_theta
            )
            f = cfg.rope_inv_freq() if configured else inv
            return _rope(q, f, c["rope_axis"], c["rope_pairing"]), _rope(k, f, c["rope_axis"], c["rope_pairing"])

        rope_key = (
            "rope",
            c["eps"],
            bias,
            ls,
            c["rope_axis"],
            c["rope_pairing"],
            c["rope_frequencies"],
            c["rope_base"],
        )
        qr, kr = self._cached(rope_key, rotated)
        n_rep = H // K
        raw = self._cached((*rope_key, c["kv_map"]), lambda: qr @ _kv(kr, n_rep, c["kv_map"]).transpose(0, 1, 3, 2))
        t, j = np.arange(T)[:, None], np.arange(T)[None, :]
        keep = {"causal": j <= t, "transposed": j >= t, "none": np.ones((T, T), bool)}[c["mask"]]
        s = np.where(keep, raw * c["scale"], -np.inf)
        e = np.exp(s - s.max(-1, keepdims=True))
        a = (e / e.sum(-1, keepdims=True)) @ _kv(v, n_rep, c["kv_map"])
        x2 = x + self._proj(a.transpose(0, 2, 1, 3).reshape(B, T, -1), "o", bias, ls)
        h2 = rms_norm(x2, self.p["post_attention_layernorm.weight"], c["eps"])
        gate, up = self._proj(h2, "gate", True, ls), self._proj(h2, "up", True, ls)
        return x2 + self._proj(ACTIVATIONS[c["activation"]](gate) * up, "down", True, ls)


def _port_input(out, case, layer: int, weights: dict) -> np.ndarray | None:
    if layer > 0:
        h = out.tensors.get(f"forward.hidden.{layer - 1}")
        return None if h is None else f64(h)
    table = [k for k in weights if k.endswith("embed_tokens.weight")]
    if len(table) != 1:
        return None
    return f64(weights[table[0]])[case.batch["input_ids"].astype(np.int64)]


def _combinations(choices: dict[str, tuple]):
    """Every combination, by how many conventions leave the reference's (0, then 1, ...): the fewest
    deviations that reproduce the layer are its explanation."""
    names = list(choices)
    for n in range(len(names) + 1):
        level = []
        for changed in itertools.combinations(names, n):
            alts = [choices[k][1:] if k in changed else choices[k][:1] for k in names]
            level += [dict(zip(names, combo)) for combo in itertools.product(*alts)]
        yield level


def explain_layer(out, case, layer: int) -> list[Diagnosis] | None:
    """The conventions under which the port's own layer `layer` reproduces its output (module docstring)."""
    weights = {k: v for k, v in out.tensors.items() if k.startswith("weights.")}
    y = out.tensors.get(f"forward.hidden.{layer}")
    x = _port_input(out, case, layer, weights)
    if not weights or y is None or x is None or np.shape(y) != np.shape(x):
        return None
    cfg = ModelConfig.from_file(case.checkpoint)
    lora = {}
    if case.lora_init is not None and case.settings.lora is not None:
        lora = {f"weights.{k}": v for k, v in load_file(str(case.lora_init)).items()}
    net = _Layer(cfg, weights, layer, lora, case.settings.lora.scale if case.settings.lora else 0.0)
    if not net.complete():
        return None
    y, real = f64(y), case.batch["attention_mask"].astype(bool)
    norm = float(np.linalg.norm((y - x)[real]))
    if not np.isfinite(norm) or norm == 0:
        return None
    choices = _choices(cfg, x.shape[-1], net.has_attention_bias, bool(net.lora))
    fit = FIT[case.settings.precision]
    fits = []
    with np.errstate(all="ignore"):
        for level in itertools.islice(_combinations(choices), MAX_DEVIATIONS + 1):
            for c in level:
                residual = float(np.linalg.norm((net(x, c) - y)[real]) / norm)
                if np.isfinite(residual) and residual <= fit:
                    fits.append((residual, c))
            if fits:
                break
    reference = {name: values[0] for name, values in choices.items()}
    if not fits or any(c == reference for _, c in fits):
        return None  # nothing reproduces it, or the reference's layer does: then its input or weights differ
    found = []
    best = min(r for r, _ in fits)
    for name in choices:
        taken = list(dict.fromkeys(c[name] for _, c in fits))
        if reference[name] in taken:
            continue  # the reference's convention reproduces the layer too: nothing to name here
        code, say = CODES[name]
        value = taken[0] if len(taken) == 1 else taken
        said = say(value, reference[name]) if len(taken) == 1 else f"{name} is one of {taken}, not {reference[name]!r}"
        found.append(
            Diagnosis(
                code,
                f"layer {layer}, re-computed from the port's own input and weights: {said}",
                {
                    "from_port_inputs": True,
                    "layer": layer,
                    "convention": name,
                    "port": value,
                    "reference": reference[name],
                    "reproduced_to": best,
                    "combinations_that_reproduce": len(fits),
                },
            )
        )
    return found or None
