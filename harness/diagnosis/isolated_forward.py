"""isolated_forward: each failing piece of the forward, solved for the convention its numbers imply.

Every piece was computed by the port from the reference's own values of its inputs, so each solver sees
one function of known inputs: the eps an RMSNorm output implies, the frequencies, base, pairing and
positions of a rotation, the scale and kv head of each query head's scores, the keys a softmax lets
through, the activation that maps gate to act. Independent bugs show in independent pieces, each named
once; a piece nothing explains is localised.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
from safetensors.numpy import load_file

from mlx_parity.reference.config import ModelConfig

from .. import pieces as P
from .core import ACTIVATIONS, Diagnosis, f64, pairs, rms_norm, rotated

_TINY = 1e-30
WEIGHT_FREE = {"rmsnorm_eps"}  # solved between rows, where the norm's weight cancels


class _Piece:
    """What a solver needs: the port's value, the golden inputs, the config, the parameters."""

    def __init__(self, case, out, name: str):
        self.name, self.case = name, case
        self.piece, self.layer = P.piece_of(name), P.layer_of(name)
        self.port = f64(out.tensors[P.PREFIX + name])
        self.golden = f64(case.golden[P.PREFIX + name])
        self.cfg = _config(case)
        self.real = case.batch["attention_mask"].astype(bool)
        self.fits = _FITS[case.settings.precision]

    def given(self, piece: str) -> np.ndarray:
        g = P.given(self.case.golden)
        if piece == "input":
            return f64(g["embed"] if self.layer == 0 else g[f"layer.{self.layer - 1}.output"])
        return f64(g[f"layer.{self.layer}.{piece}"] if self.layer is not None else g[piece])

    def param(self, name: str) -> np.ndarray | None:
        p = self.case.initial_weights.get(f"weights.{name}")
        return None if p is None else f64(p)


def _config(case) -> dict:
    """The config as the reference reads it (both transformers layouts), plus hidden_act."""
    raw = json.loads((case.checkpoint / "config.json").read_text())
    return dataclasses.asdict(ModelConfig.from_file(case.checkpoint)) | {"hidden_act": raw.get("hidden_act", "silu")}


def _heads(cfg: dict) -> tuple[int, int, int]:
    return cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]


def _close_fit(port: np.ndarray, model: np.ndarray, where=None) -> float:
    """Relative residual of a hypothesis: |port − model| / |port| over the judged elements."""
    d, p = port - model, port
    if where is not None:
        where = np.broadcast_to(where, d.shape)
        d, p = d[where], p[where]
    return float(np.linalg.norm(d) / max(np.linalg.norm(p), _TINY))


# A hypothesis reproduces a piece when its relative residual is below this: float32 pieces sit at ~1e-7; a
# bfloat16 piece is one bfloat16 rounding of its exact value (~2e-3 rms), so there the threshold is 8 unit roundoffs.
_FITS = {"float32": 1e-4, "bfloat16": 8 * 2.0**-8}


# --- norms ---------------------------------------------------------------------------------------
def _norm_input(pc: _Piece) -> np.ndarray:
    if pc.piece == "input_norm":
        return pc.given("input")
    if pc.piece == "post_norm":
        return pc.given("input") + pc.given("o_proj")
    return f64(P.given(pc.case.golden)[f"layer.{P.num_layers(pc.case.golden) - 1}.output"])


def _norm_weight(pc: _Piece) -> np.ndarray | None:
    name = {
        "input_norm": f"model.layers.{pc.layer}.input_layernorm.weight",
        "post_norm": f"model.layers.{pc.layer}.post_attention_layernorm.weight",
        "head.norm": "model.norm.weight",
    }[pc.piece]
    return pc.param(name)


def _eps_fit(pc: _Piece, x: np.ndarray, y: np.ndarray, eps: float) -> float:
    """The relative residual of the port's norm output under `eps`, with the weight its rows imply."""
    u = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    ur, yr = u[pc.real], y[pc.real]
    implied_w = (ur * yr).sum(0) / np.maximum((ur * ur).sum(0), _TINY)
    return _close_fit(y, implied_w * u, pc.real[..., None])


def _norm(pc: _Piece) -> Diagnosis | None:
    """y = w·x / sqrt(mean(x²) + eps). Between two rows the weight cancels: (y_a/x_a)/(y_b/x_b) = r_b/r_a
    with r² = mean(x²) + eps, so eps is solved without trusting the port's (or the checkpoint's) weight."""
    x, y = _norm_input(pc), pc.port
    if y.shape != x.shape:
        return None
    eps = pc.cfg["rms_norm_eps"]
    rows_x, rows_y = x[pc.real], y[pc.real]  # [N, d] real tokens
    ms = (rows_x**2).mean(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = rows_y / rows_x  # = w / r_row, per element
    ok = np.isfinite(g) & (np.abs(rows_x) > 1e-3 * np.abs(rows_x).max())
    base = int(np.argmin(ms))  # pair every row with the one of least energy: the largest lever on eps
    estimates = []
    for r in range(len(ms)):
        both = ok[r] & ok[base]
        if r == base or not both.any() or ms[r] < 1.5 * ms[base]:
            continue
        k2 = float(np.median(g[base][both] / g[r][both])) ** 2  # (r_r / r_base)²
        if abs(k2 - 1) > 1e-6:
            estimates.append((ms[r] - k2 * ms[base]) / (k2 - 1))
    if not estimates:
        return None
    est = float(np.median(estimates))
    evidence = {"implied_eps": est, "configured_eps": eps}
    scale = float(ms[base])  # eps is resolvable to about float32 rounding of this
    w = _norm_weight(pc)
    centred = x - x.mean(-1, keepdims=True)
    if _close_fit(y, rms_norm(centred, 1.0 if w is None else w, eps), pc.real[..., None]) < pc.fits:
        return Diagnosis(
            "layer_norm",
            f"{pc.piece} subtracts each row's mean before normalising: a LayerNorm where the model has an RMSNorm",
            {"configured_eps": eps},
        )
    if abs(est - eps) > max(0.3 * eps, 1e-5 * scale):
        # named only when that eps reproduces the port's output and the configured one does not, each with
        # the weight the port's rows imply (per column, by least squares: the port's weight need not be the
        # checkpoint's, as when nothing loaded)
        if est <= 0 or _eps_fit(pc, x, y, est) >= pc.fits or _eps_fit(pc, x, y, eps) < pc.fits:
            return None
        evidence |= {
            "residual_at_implied_eps": _eps_fit(pc, x, y, est),
            "residual_at_configured_eps": _eps_fit(pc, x, y, eps),
        }
        return Diagnosis(
            "rmsnorm_eps", f"RMSNorm implies eps = {est:.3g}, not the config's rms_norm_eps = {eps:g}", evidence
        )
    if w is not None and _close_fit(y, rms_norm(x, 1.0, eps), pc.real[..., None]) < pc.fits:
        return Diagnosis(
            "norm_weight",
            f"{pc.piece} equals x/sqrt(mean(x²)+eps) without its weight: the norm's weight is not applied",
            evidence,
        )
    return None


# --- projections ---------------------------------------------------------------------------------
_PROJ = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
_PROJ_INPUT = {
    "q": "input_norm",
    "k": "input_norm",
    "v": "input_norm",
    "o_proj": "attn",
    "gate": "post_norm",
    "up": "post_norm",
    "down": "act",
}


def _flat(y: np.ndarray) -> np.ndarray:
    """Per-head [B, heads, T, D] back to the projection's [B, T, heads·D]."""
    return y.transpose(0, 2, 1, 3).reshape(y.shape[0], y.shape[2], -1) if y.ndim == 4 else y


def _projection(pc: _Piece) -> Diagnosis | None:
    if pc.piece == "head.logits":
        module = "model.embed_tokens" if pc.cfg.get("tie_word_embeddings") else "lm_head"
        x = f64(P.given(pc.case.golden)["head.norm"])
    else:
        module = f"model.layers.{pc.layer}.{_PROJ[pc.piece]}"
        x = pc.given(_PROJ_INPUT[pc.piece])
    W, b = pc.param(f"{module}.weight"), pc.param(f"{module}.bias")
    y, ref = _flat(pc.port), _flat(pc.golden)
    if W is None or y.shape != ref.shape:
        return None
    real = pc.real[..., None]
    if b is not None and _close_fit(y, ref - b, real) < pc.fits:
        return Diagnosis(
            "bias_missing",
            f"{module.rsplit('.', 1)[-1]} output equals the reference's minus the checkpoint's bias: the bias is not added",
            {"module": module, "bias_norm": float(np.linalg.norm(b))},
        )
    if W.shape[0] == W.shape[1] and _close_fit(y, x @ W + (0 if b is None else b), real) < pc.fits:
        return Diagnosis(
            "weight_transposed",
            f"{module.rsplit('.', 1)[-1]} multiplies by its weight untransposed (x·W, not x·Wᵀ)",
            {"module": module},
        )
    lora = _lora_branch(pc, module, x)
    if lora is not None:
        branch, scale = lora
        k = float(
            ((y - ref) * branch)[np.broadcast_to(real, y.shape)].sum()
            / max((branch * branch)[np.broadcast_to(real, y.shape)].sum(), _TINY)
        )
        if _close_fit(y, ref + k * branch, real) < pc.fits and abs(k) > 1e-3 * abs(scale):
            return Diagnosis(
                "lora_scale",
                f"{module.rsplit('.', 1)[-1]}'s LoRA branch enters with scale {scale + k:.4g}, not the configured {scale:g}",
                {"module": module, "implied_scale": scale + k, "configured_scale": scale},
            )
    return None


def _lora_branch(pc: _Piece, module: str, x: np.ndarray):
    path = pc.case.lora_init
    if path is None or pc.case.settings.lora is None:
        return None
    adapters = load_file(str(path))
    a, b = adapters.get(f"{module}.lora_a"), adapters.get(f"{module}.lora_b")
    if a is None or b is None:
        return None
    return (x @ f64(a)) @ f64(b), pc.case.settings.lora.scale


# --- RoPE ----------------------------------------------------------------------------------------
def _rope(pc: _Piece) -> Diagnosis | list | None:
    """A convention is named only when rotating the given input by it reproduces the port's output (the
    residual below the piece's fit); a piece no convention reproduces is localised, never guessed at."""
    x, y = pc.given(pc.piece.removesuffix("_rope")), pc.port
    if y.shape != x.shape or x.shape[-1] % 2:
        return None
    real = pc.real[:, None, :, None]
    return _rope_rotation(pc, x, y, real) or _rope_dims(pc, x, y, real, pc.cfg["rope_theta"])


def _rope_rotation(pc: _Piece, x: np.ndarray, y: np.ndarray, real: np.ndarray) -> Diagnosis | list | None:
    """Find the pairing under which the port's output is a rotation of the given input, then its angles:
    frequencies (→ base), the position each row was rotated for (or the head), and the direction."""
    B, Hh, T, D = x.shape
    model = ModelConfig.from_file(pc.case.checkpoint)
    theta = pc.cfg["rope_theta"]
    plain = theta ** (-np.arange(0, D, 2) / D)
    expected = model.rope_inv_freq() if model.head_dim == D else plain  # the config's scaling applied
    t = np.arange(T)[:, None]

    def reproduces(halves: bool, angle: np.ndarray) -> bool:
        return _close_fit(y, rotated(x, halves, angle), real) <= pc.fits

    fits = {}
    for halves in (True, False):
        (x1, x2), (y1, y2) = pairs(x, halves), pairs(y, halves)
        nx, ny = np.hypot(x1, x2), np.hypot(y1, y2)
        keep = np.broadcast_to(real, nx.shape) & (nx > 1e-3 * nx.max())
        fits[halves] = float(np.median(np.abs(ny[keep] - nx[keep]) / nx[keep])) if keep.any() else np.inf
    halves = fits[True] <= fits[False]
    if min(fits.values()) > max(1e-3, pc.fits):
        return None  # not a rotation of pairs
    heads = np.arange(Hh)[:, None, None]
    for freqs in (expected, plain) if model.rope_type != "default" else (expected,):
        if reproduces(True, (heads * freqs)[None]):
            axis = Diagnosis(
                "rope_position",
                f"{pc.piece} is rotated by the head index, not the position: RoPE applied along the head axis "
                "(a [B, T, heads, head_dim] tensor where [B, heads, T, head_dim] belongs)",
                {"pairing": "halves (rotate_half)", "rotated_by": "head index"},
            )
            if freqs is expected:
                return axis
            return [axis, _unscaled(pc, model)]
    (x1, x2), (y1, y2) = pairs(x, halves), pairs(y, halves)
    angle = np.arctan2(x1 * y2 - x2 * y1, x1 * y1 + x2 * y2)  # [B, H, T, D/2]
    valid = np.broadcast_to(real, angle.shape)
    per_t = np.array(
        [
            [
                np.median(angle[:, :, t, i][valid[:, :, t, i]]) if valid[:, :, t, i].any() else np.nan
                for i in range(D // 2)
            ]
            for t in range(T)
        ]
    )  # [T, D/2]
    step = np.angle(np.exp(1j * np.diff(per_t, axis=0)))  # the angle added per position, wrapped
    freq = np.nanmedian(step, axis=0)  # [D/2]
    evidence = {"pairing": "halves (rotate_half)" if halves else "interleaved (traditional)"}
    if not halves:
        if not reproduces(False, t * expected):
            return None
        return Diagnosis(
            "rope_pairing",
            f"{pc.piece} rotates interleaved pairs (2i, 2i+1); the reference rotates halves (i, i+D/2)",
            evidence,
        )
    if np.all(np.isfinite(freq)) and np.median(freq[1:] / expected[1:]) < 0:
        if not reproduces(True, -t * expected):
            return None
        return Diagnosis("rope_direction", f"{pc.piece} rotates by −angle: sin enters with the opposite sign", evidence)
    i = np.arange(D // 2)
    usable = (i > 0) & (np.abs(freq) * (T - 1) > 1e-2) & np.isfinite(freq)
    resolved = usable | (i == 0)
    if (
        model.rope_type != "default"
        and np.allclose(freq[resolved], plain[resolved], rtol=1e-3)
        and not np.allclose(freq[resolved], expected[resolved], rtol=1e-3)
    ):
        if not reproduces(True, t * plain):
            return None
        d = _unscaled(pc, model)
        d.evidence |= evidence | {"frequencies": [round(float(f), 6) for f in freq]}
        return d
    base = float(np.median(np.abs(freq[usable]) ** (-D / (2 * i[usable])))) if usable.any() else float("nan")
    evidence |= {
        "implied_base": base,
        "configured_rope_theta": theta,
        "frequencies": [round(float(f), 6) for f in freq[:4]],
    }
    if model.rope_type == "default" and np.isfinite(base) and abs(math.log(base / theta)) > 0.05:
        if not reproduces(True, t * base ** (-np.arange(0, D, 2) / D)):
            return None
        return Diagnosis(
            "rope_base",
            f"{pc.piece}'s frequencies imply a RoPE base of {base:.4g}, not the config's rope_theta = {theta:g}",
            evidence,
        )
    position = (
        np.unwrap(per_t[:, 0]) / expected[0]
    )  # the fastest pair turns 1 rad per position: unwrapped, the position
    offset = position - np.arange(T)
    if np.nanmax(np.abs(offset)) > 0.25:
        shift = float(np.round(np.nanmedian(offset)))
        if not reproduces(True, (t + shift) * expected):
            return None
        return Diagnosis(
            "rope_position",
            f"{pc.piece} is rotated for other positions than 0..T-1 (row t rotated for t{shift:+.0f})",
            evidence | {"implied_positions": [round(float(p), 3) for p in position]},
        )
    return None


def _unscaled(pc: _Piece, model: ModelConfig) -> Diagnosis:
    return Diagnosis(
        "rope_scaling",
        f"{pc.piece}'s frequencies are rope_theta's unscaled ones: the config's {model.rope_type} scaling "
        f"({', '.join(f'{k} {v:g}' for k, v in model.rope_scaling)}) is not applied",
        {"expected": [round(float(f), 6) for f in model.rope_inv_freq()]},
    )


def _rope_dims(pc: _Piece, x: np.ndarray, y: np.ndarray, real: np.ndarray, theta: float) -> Diagnosis | None:
    """A rotation of fewer dimensions than head_dim (a port that sizes RoPE by hidden/heads, or a partial
    rotary factor where the config has none): the last dimensions pass unchanged, the first `dims` are the
    textbook rotation of `dims` dimensions. Named only when that reproduces the port's output."""
    D, T = x.shape[-1], x.shape[-2]
    t = np.arange(T)[:, None]
    for dims in range(D - 2, 0, -2):
        head = x[..., :dims]
        angle = t * theta ** (-np.arange(0, dims, 2) / dims)
        for halves in (True, False):
            m = np.concatenate([rotated(head, halves, angle), x[..., dims:]], -1)
            if _close_fit(y, m, real) <= pc.fits:
                return Diagnosis(
                    "rope_dims",
                    f"{pc.piece} rotates the first {dims} of head_dim = {D} dimensions "
                    f"({'halves' if halves else 'interleaved pairs'} of {dims}); the rest pass unrotated",
                    {"rotated_dims": dims, "head_dim": D},
                )
    return None


# --- attention -----------------------------------------------------------------------------------
def _head_fit(port_h: np.ndarray, candidates: list[np.ndarray], where) -> tuple[int, float, float]:
    """The candidate and scale c that best explain one head's values: port ≈ c·candidate."""
    best = (-1, float("nan"), np.inf)
    w = np.broadcast_to(where, port_h.shape)
    for j, cand in enumerate(candidates):
        c = float((port_h * cand)[w].sum() / max((cand * cand)[w].sum(), _TINY))
        r = _close_fit(port_h, c * cand, where)
        if r < best[2]:
            best = (j, c, r)
    return best


def _scores(pc: _Piece) -> Diagnosis | None:
    H, K, D = _heads(pc.cfg)
    q, k, s = pc.given("q_rope"), pc.given("k_rope"), pc.port
    if s.shape != pc.golden.shape:
        return None
    real = pc.real[:, :, None] & pc.real[:, None, :]
    finite = np.isfinite(s)
    raw = [q @ k[:, j : j + 1].transpose(0, 1, 3, 2) for j in range(K)]  # [B, H, T, T] per kv head
    mapping, scales = [], []
    for h in range(H):
        j, c, r = _head_fit(np.where(finite[:, h], s[:, h], 0), [x[:, h] for x in raw], real & finite[:, h])
        if r > pc.fits * 10:
            return _scores_across_batch(pc, q, k, s, real, finite)
        mapping.append(j)
        scales.append(c)
    n_rep = H // K
    expected_map = [h // n_rep for h in range(H)]
    scale = float(np.median(scales))
    evidence = {"kv_head_of_query_head": mapping, "expected": expected_map}
    found = []
    if mapping != expected_map:
        tiled = [h % K for h in range(H)]
        how = "tiled (h % kv_heads)" if mapping == tiled else "another map"
        found.append(
            Diagnosis("gqa_head_mapping", f"query heads read kv heads {mapping}, not {expected_map}: {how}", evidence)
        )
    found += _attention_scale(scale, D, evidence)
    return found or None


def _attention_scale(scale: float, D: int, evidence: dict) -> list[Diagnosis]:
    if abs(scale * D**0.5 - 1) <= 1e-3:
        return []
    return [
        Diagnosis(
            "attention_scale",
            f"attention logits are scaled by {scale:.4g} = 1/{1 / scale:.4g}, not 1/sqrt(head_dim) = 1/{D**0.5:.4g}"
            + (" (1/head_dim)" if abs(scale * D - 1) < 1e-3 else ""),
            evidence | {"implied_scale": scale, "expected_scale": D**-0.5},
        )
    ]


def _across_batch(pc: _Piece, port, candidate, where, shape) -> tuple[dict, list[float]] | None:
    """Each query head of each batch row fitted against every kv head of every row, `candidate(b, h, bb, j)`
    its value had it read kv head j of row bb: {(b, h): (bb, j)} and the fitted scales, when every (row,
    head) is reproduced and some row reads another row's; else None."""
    B, H, K = shape
    read, scales = {}, []
    for b in range(B):
        for h in range(H):
            cands = [candidate(b, h, bb, j) for bb in range(B) for j in range(K)]
            i, c, r = _head_fit(np.where(np.isfinite(port[b, h]), port[b, h], 0), cands, where(b, h))
            if r > pc.fits * 10:
                return None
            read[(b, h)] = divmod(i, K)
            scales.append(c)
    if all(bb == b for (b, _), (bb, _) in read.items()):
        return None  # within each row, and still no single map over the rows: not a layout the solver knows
    return read, scales


def _read_across_batch(read: dict, what: str) -> Diagnosis:
    crossed = sum(bb != b for (b, _), (bb, _) in read.items())
    return Diagnosis(
        "gqa_head_mapping",
        f"{crossed} of {len(read)} (batch row, query head) pairs take {what} from a kv head of another batch row: "
        "the kv heads are repeated across the batch (a flat concatenation), not per group within each row",
        {"kv_row_and_head_of_query_row_and_head": {f"{b},{h}": list(v) for (b, h), v in read.items()}},
    )


def _scores_across_batch(pc: _Piece, q, k, s, real, finite) -> list[Diagnosis] | None:
    """Scores whose query heads read the keys of other batch rows (`_across_batch`)."""
    B, H, K, D = q.shape[0], q.shape[1], k.shape[1], q.shape[-1]
    found = _across_batch(
        pc, s, lambda b, h, bb, j: q[b, h] @ k[bb, j].T, lambda b, h: real[b] & finite[b, h], (B, H, K)
    )
    if found is None:
        return None
    read, scales = found
    d = _read_across_batch(read, "keys")
    return [d, *_attention_scale(float(np.median(scales)), D, d.evidence)]


def _probs(pc: _Piece) -> Diagnosis | None:
    """Which keys each query sees (the mask, solved), and over which axis the softmax normalises."""
    s, p = pc.given("scores"), pc.port
    if p.shape != s.shape:
        return None
    B, H, T, _ = p.shape
    rows = pc.real  # [B, T]
    seen = np.zeros((T, T), bool)
    for b in range(B):
        n = int(rows[b].sum())
        seen[:n, :n] |= (np.abs(p[b, :, :n, :n]) > 1e-12).any(0)
    t, j = np.arange(T)[:, None], np.arange(T)[None, :]
    n_real = int(rows.sum(1).max())
    sub = seen[:n_real, :n_real]
    tt, jj = t[:n_real, :n_real], j[:n_real, :n_real]
    if not np.array_equal(sub, jj <= tt):
        if np.array_equal(sub, jj >= tt):
            rule = "keys t..T-1 (the triangle transposed: each token sees the ones after it)"
        elif sub.all():
            rule = "every key (no causal mask)"
        else:
            offsets = [k for k in range(-T + 1, T) if np.array_equal(sub, jj <= tt + k)]
            rule = f"keys 0..t{offsets[0]:+d} (the diagonal moved)" if offsets else "another set of keys"
        return Diagnosis(
            "causal_mask",
            f"query t sees {rule}, not keys 0..t",
            {"visible_keys_of_query_0_to_3": [list(map(int, np.flatnonzero(r))) for r in sub[:4]]},
        )
    masked = np.where(jj <= tt, s[..., :n_real, :n_real], -np.inf) if n_real else s
    col = np.exp(masked - masked.max(-2, keepdims=True))
    over_queries = col / col.sum(-2, keepdims=True)
    if n_real and _close_fit(p[..., :n_real, :n_real], np.nan_to_num(over_queries)) < pc.fits:
        return Diagnosis(
            "softmax_axis", "attention probabilities are normalised over queries (columns sum to 1), not over keys", {}
        )
    return None


def _attn(pc: _Piece) -> Diagnosis | None:
    H, K, D = _heads(pc.cfg)
    probs, v, a = pc.given("probs"), pc.given("v"), pc.port
    if a.shape != pc.golden.shape:
        return None
    B, T, _ = a.shape
    per_head = probs @ np.repeat(v, H // K, axis=1)  # [B, H, T, D]
    if _close_fit(a, per_head.reshape(B, T, H * D), pc.real[..., None]) < pc.fits:
        return Diagnosis(
            "attention_merge",
            "the heads' outputs are reshaped from [B, heads, T, D] without moving heads next to head_dim",
            {},
        )
    heads = a.reshape(B, T, H, D).transpose(0, 2, 1, 3)
    real = pc.real[:, :, None]
    mapping = []
    for h in range(H):
        j, c, r = _head_fit(heads[:, h], [probs[:, h] @ v[:, m] for m in range(K)], real)
        if r > pc.fits * 10 or abs(c - 1) > 1e-3:
            found = _across_batch(
                pc, heads, lambda b, h, bb, j: probs[b, h] @ v[bb, j], lambda b, h: real[b], (B, H, K)
            )
            return (
                None
                if found is None or any(abs(c - 1) > 1e-3 for c in found[1])
                else _read_across_batch(found[0], "values")
            )
        mapping.append(j)
    expected = [h // (H // K) for h in range(H)]
    if mapping != expected:
        return Diagnosis(
            "gqa_head_mapping",
            f"query heads take values from kv heads {mapping}, not {expected}",
            {"kv_head_of_query_head": mapping, "expected": expected},
        )
    return None


# --- MLP -----------------------------------------------------------------------------------------
def _act(pc: _Piece) -> Diagnosis | None:
    gate, up, y = pc.given("gate"), pc.given("up"), pc.port
    if y.shape != gate.shape:
        return None
    real = pc.real[..., None]
    for name, fn in ACTIVATIONS.items():
        for swapped in (False, True):
            a, b = (up, gate) if swapped else (gate, up)
            if _close_fit(y, fn(a) * b, real) < pc.fits:
                if swapped:
                    return Diagnosis(
                        "gate_up_swapped",
                        f"act = {name}(up)·gate: gate_proj and up_proj exchange roles",
                        {"activation": name},
                    )
                if name != "silu":
                    return Diagnosis(
                        "mlp_activation",
                        f"act = {name}(gate)·up: the MLP uses {name}, the config's hidden_act is "
                        f"{pc.cfg.get('hidden_act', 'silu')}",
                        {"activation": name},
                    )
                return None
    return None


def _embed(pc: _Piece) -> Diagnosis | None:
    W, ids = pc.param("model.embed_tokens.weight"), pc.case.batch["input_ids"]
    if W is None or pc.port.shape != pc.golden.shape:
        return None
    ref = W[ids]
    c = float((pc.port * ref).sum() / max((ref * ref).sum(), _TINY))
    if abs(c - 1) > 1e-3 and _close_fit(pc.port, c * ref, pc.real[..., None]) < pc.fits:
        return Diagnosis(
            "embedding_scale",
            f"token embeddings are scaled by {c:.4g}"
            + (" = sqrt(hidden_size)" if abs(c - math.sqrt(W.shape[1])) < 1e-3 * c else ""),
            {"implied_scale": c},
        )
    return None


SOLVERS = {
    "input_norm": _norm,
    "post_norm": _norm,
    "head.norm": _norm,
    "q": _projection,
    "k": _projection,
    "v": _projection,
    "o_proj": _projection,
    "gate": _projection,
    "up": _projection,
    "down": _projection,
    "head.logits": _projection,
    "q_rope": _rope,
    "k_rope": _rope,
    "scores": _scores,
    "probs": _probs,
    "attn": _attn,
    "act": _act,
    "embed": _embed,
}


def forward_pieces(result, out, case) -> list[Diagnosis] | None:
    """One diagnosis per distinct cause, each with the pieces (over all layers) it was found in."""
    failing = [t for t in result.failures if t.name.startswith(P.PREFIX)]
    by_layer: dict[int | None, set[str]] = {}
    for t in failing:
        by_layer.setdefault(P.layer_of(t.name), set()).add(P.piece_of(t.name))
    found: dict[tuple, Diagnosis] = {}
    for t in sorted(
        failing,
        key=lambda t: (
            P.names(P.num_layers(case.golden)).index(t.name.removeprefix(P.PREFIX))
            if t.name.removeprefix(P.PREFIX) in P.names(P.num_layers(case.golden))
            else 10**6
        ),
    ):
        name, piece, layer = t.name.removeprefix(P.PREFIX), P.piece_of(t.name), P.layer_of(t.name)
        if piece == "output" and by_layer.get(layer, set()) - {"output"}:
            continue  # follows from a failing piece of the same layer
        diagnoses = None
        if not t.problem and P.PREFIX + name in out.tensors:
            if piece == "output":
                diagnoses = Diagnosis(
                    "layer_wiring",
                    f"layer {layer}: every piece agrees on the reference's inputs but the layer's own "
                    "chain does not (residual connections, the order of the pieces)",
                    {},
                )
            elif piece in SOLVERS:
                diagnoses = SOLVERS[piece](_Piece(case, out, name))
        for d in diagnoses if isinstance(diagnoses, list) else [diagnoses or _unexplained(t, piece)]:
            key = (d.code, d.summary.split(":")[0] if d.code == "piece_divergence" else "")
            if key in found:
                found[key].pieces.append(name)
            else:
                d.pieces = [name]
                found[key] = d
    for d in found.values():
        kinds = list(dict.fromkeys(P.piece_of(n) for n in d.pieces))
        if len(kinds) > 1:
            d.summary += f" (the same at {', '.join(kinds[1:])})"
        d.parameters = [] if d.code in WEIGHT_FREE else sorted({p for n in d.pieces for p in P.parameters(n)})
        d.evidence = d.evidence | {"pieces": d.pieces}
    return list(found.values()) or None


def _unexplained(t, piece: str) -> Diagnosis:
    if t.problem:  # absent, or of another shape or dtype: said as it is, not as a difference of values
        return Diagnosis("piece_divergence", f"{piece}: {t.problem}", {"worst": t.name, "problem": t.problem})
    return Diagnosis(
        "piece_divergence",
        f"{piece}: differs on the reference's own inputs; no solved convention explains it",
        {"worst": t.name, "max_abs": t.max_abs, "max_rel": t.max_rel, "where": t.where, "mismatched": t.mismatched},
    )
