"""weight_mapping: which parameters hold what, and why."""

from __future__ import annotations

import json

import numpy as np

from mlx_parity.reference.precision import ADAPTER_SUFFIXES
from mlx_parity.reference.weights import IGNORED_KEYS

from .core import Diagnosis, common_affix, f64

LM_HEAD = "lm_head.weight"


def weights(result, out, case) -> list[Diagnosis] | None:
    """Every distinct cause: a separate lm_head where the config ties it is one, whatever else the key map
    gets wrong; checkpoint keys the reference ignores too (RoPE's inv_freq buffers) are none."""
    report = out.meta.get("load_report") or {}
    missing = report.get("missing") or []
    unexpected = [u for u in report.get("unexpected") or [] if not IGNORED_KEYS.search(u)]
    expected = case.initial_weights
    actual = {k: v for k, v in out.tensors.items() if k.startswith("weights.")}
    found = []
    tied = _tied(case) and (f"weights.{LM_HEAD}" in actual or LM_HEAD in missing)
    if tied and f"weights.{LM_HEAD}" not in expected:
        found.append(
            Diagnosis(
                "tied_embeddings_ignored",
                "the config ties lm_head to embed_tokens, but the port has a separate lm_head.weight",
                {"tie_word_embeddings": True, "lm_head_loaded": LM_HEAD not in missing},
                parameters=[LM_HEAD, "model.embed_tokens.weight"],  # trained apart where the reference trains one
            )
        )
        missing = [m for m in missing if m != LM_HEAD]
        actual = {k: v for k, v in actual.items() if k != f"weights.{LM_HEAD}"}
    rest = _mapping(
        result, case, missing, unexpected, expected, actual, skip={f"weights.{LM_HEAD}"} if found else set()
    )
    return found + (rest if isinstance(rest, list) else [rest] if rest else []) or None


def _renamed(missing: list[str], unexpected: list[str]) -> Diagnosis | None:
    """Parameters whose names differ from a checkpoint key in one component, the same one every time
    (`attention` for `self_attn`): a rename in the port's module tree, so those tensors never load."""
    by_shape = {}
    for u in unexpected:
        by_shape.setdefault(len(u.split(".")), []).append(u.split("."))
    pairs = {}
    for m in missing:
        parts = m.split(".")
        for u in by_shape.get(len(parts), []):
            diff = [i for i, (a, b) in enumerate(zip(parts, u)) if a != b]
            if len(diff) == 1:
                pairs.setdefault((parts[diff[0]], u[diff[0]]), []).append(m)
    if not pairs:
        return None
    (port_name, ckpt_name), names = max(pairs.items(), key=lambda kv: len(kv[1]))
    return Diagnosis(
        "key_mapping",
        f"the port names {port_name!r} what the checkpoint names {ckpt_name!r}: {len(names)} parameters "
        "never load from their checkpoint tensors",
        {"port": port_name, "checkpoint": ckpt_name, "never_loaded": names[:10]},
    )


def _not_in_checkpoint(missing: list[str], unexpected: list[str], expected, renamed: Diagnosis | None):
    """Parameters no checkpoint tensor matches, even renamed: the port's model has modules the checkpoint
    (and so the config) does not, which keep their initialisation (a bias the family has none of)."""
    port, ckpt = (renamed.evidence["port"], renamed.evidence["checkpoint"]) if renamed else ("", "")
    keys = set(unexpected) | {k.removeprefix("weights.") for k in expected}
    names = [m for m in missing if ".".join(ckpt if p == port else p for p in m.split(".")) not in keys]
    if not names:
        return None
    kinds = sorted({m.rsplit(".", 1)[-1] for m in names})
    return Diagnosis(
        "parameters_not_in_checkpoint",
        f"{len(names)} parameters of the port have no checkpoint tensor at all ({', '.join(kinds[:4])}: "
        f"{', '.join(names[:3])}{', …' if len(names) > 3 else ''}): the port's model adds them, and they keep "
        "their initialisation",
        {"not_in_checkpoint": names[:10], "count": len(names)},
    )


def _unused(names: list[str], unexpected: list[str]) -> Diagnosis:
    """Checkpoint tensors no parameter of the port takes: a module or tensor its model does not have."""
    kinds = sorted({".".join(n.split(".")[-2:]) for n in names})  # module and tensor: `q_proj.bias`
    return Diagnosis(
        "checkpoint_tensors_unused",
        f"{len(names)} checkpoint tensors fill no parameter of the port ({', '.join(kinds[:4])}"
        f"{', …' if len(kinds) > 4 else ''}): the port's model has no such parameters",
        {"unused": names[:10], "load_report_unexpected": unexpected[:10]},
    )


def _mapping(result, case, missing, unexpected, expected, actual, skip) -> Diagnosis | list[Diagnosis] | None:
    renamed = _renamed(missing, unexpected) if missing and unexpected else None
    added = _not_in_checkpoint(missing, unexpected, expected, renamed) if missing else None
    if renamed or (added and not unexpected):
        return [d for d in (renamed, added) if d]
    if missing and unexpected:
        for pre in {u.split(".", 1)[0] + "." for u in unexpected if "." in u}:
            if all(u.startswith(pre) for u in unexpected) and {u[len(pre) :] for u in unexpected} & set(missing):
                return Diagnosis(
                    "key_mapping",
                    f"checkpoint keys carry a {pre!r} prefix the loader does not strip (or adds)",
                    {"prefix": pre, "missing": missing[:5], "unexpected": unexpected[:5]},
                )
        shapes = {np.shape(actual[f"weights.{m}"]) for m in missing if f"weights.{m}" in actual}
        unused_shapes = {np.shape(expected[f"weights.{u}"]) for u in unexpected if f"weights.{u}" in expected}
        if added and added.evidence["count"] == len(missing) and unused_shapes and not shapes & unused_shapes:
            # every unfilled parameter is one the checkpoint has no tensor for, and no unused tensor has the shape
            # of one, so none is another's name: two separate facts (biases added, q/k norms left out)
            return [added, _unused(unexpected, unexpected)]
        return Diagnosis(
            "key_mapping",
            f"{len(missing)} parameters unfilled and {len(unexpected)} checkpoint keys unused",
            {"missing": missing[:10], "unexpected": unexpected[:10]},
        )
    extra = sorted(set(actual) - set(expected))
    absent = sorted(set(expected) - set(actual))
    if absent and not extra and not missing and all(f"weights.{u}" in absent for u in unexpected):
        names = [a.removeprefix("weights.") for a in absent]
        if all(n.endswith(ADAPTER_SUFFIXES) for n in names):  # lora_init's, not the checkpoint's
            return Diagnosis(
                "lora_adapters_missing",
                f"the port has no LoRA adapters: the {len(names)} adapters of lora_init.safetensors fill no "
                "parameter of its model (it does not train `trainable: lora` as the settings say)",
                {"unused": names[:10], "load_report_unexpected": unexpected[:10]},
            )
        return _unused(names, unexpected)
    tensors = [t for t in result.tensors if t.name not in skip]
    wrong = [t.name for t in tensors if not t.passed and t.name in expected and t.name in actual]
    if not wrong and (extra or [t for t in tensors if t.problem]):
        return Diagnosis(
            "key_mapping",
            "the port's parameter names differ from the checkpoint's",
            {
                "extra": extra[:10],
                "absent": [t.name for t in tensors if t.problem and "absent" in t.problem][:10],
            },
        )
    if not wrong:
        return None
    if case.settings.precision == "bfloat16" and all(_rounds_to(actual[n], expected[n]) for n in wrong):
        return Diagnosis(
            "precision_mismatch",
            f"{len(wrong)} parameters hold the checkpoint's values unrounded where bfloat16 "
            "training rounds them to bfloat16: the port trains in float32",
            {"not_rounded": [w.removeprefix("weights.") for w in wrong[:10]]},
        )
    by_value = {}
    for name in wrong:
        match = next(
            (
                k
                for k, v in expected.items()
                if k != name and v.shape == actual[name].shape and np.array_equal(v, actual[name])
            ),
            None,
        )
        if match:
            by_value[name.removeprefix("weights.")] = match.removeprefix("weights.")
    if by_value:
        return Diagnosis(
            "key_mapping",
            "parameters hold another key's checkpoint tensor (a rename or swap in the key map)",
            {"holds": by_value},
        )
    reshaped = {
        w.removeprefix("weights."): [list(np.shape(actual[w])), list(np.shape(expected[w]))]
        for w in wrong
        if np.shape(actual[w]) != np.shape(expected[w])
    }
    if reshaped:
        transposed = all(a == e[::-1] for a, e in reshaped.values())
        return Diagnosis(
            "parameter_shape",
            f"{len(reshaped)} parameters have another shape than their checkpoint tensor "
            f"({', '.join(list(reshaped)[:3])}): "
            + (
                "each is the checkpoint's transposed, stored as [in, out]"
                if transposed
                else "the port builds its model from other dimensions than the config's (heads, head_dim, sizes)"
            ),
            {"port_vs_checkpoint_shape": dict(list(reshaped.items())[:10])},
        )
    stats = {}
    for name in [w for w in wrong if np.size(actual[w]) and np.size(expected[w])][:8]:
        a, e = f64(actual[name]), f64(expected[name])
        corr = float(np.corrcoef(a.ravel(), e.ravel())[0, 1]) if a.size > 1 and a.std() > 0 and e.std() > 0 else 0.0
        stats[name.removeprefix("weights.")] = {
            "mean": round(float(a.mean()), 5),
            "std": round(float(a.std()), 5),
            "checkpoint_std": round(float(e.std()), 5),
            "correlation_with_checkpoint": round(corr, 3),
        }
    share = len(wrong) / max(1, len(expected))
    names = [w.removeprefix("weights.") for w in wrong]
    if share > 0.5:
        return Diagnosis(
            "weights_not_loaded",
            f"{len(wrong)} of {len(expected)} parameters equal no checkpoint tensor: "
            "the model keeps its initialisation (weights never loaded)",
            {"share_not_loaded": round(share, 3), "examples": stats},
        )
    pattern = common_affix(names)
    return Diagnosis(
        "key_mapping",
        f"{', '.join(names[:4])}: {'equals' if len(names) == 1 else 'equal'} no checkpoint tensor, initialisation statistics kept: "
        "their keys never mapped" + (f" (common to all: {pattern!r})" if pattern else ""),
        {"not_loaded": names, "examples": stats},
    )


def _rounds_to(value: np.ndarray, rounded: np.ndarray) -> bool:
    """`value` rounded to bfloat16 (MLX's rounding, nearest even) is `rounded`."""
    import mlx.core as mx

    v = np.asarray(value, np.float32)
    return v.shape == np.shape(rounded) and np.array_equal(
        np.array(mx.array(v).astype(mx.bfloat16).astype(mx.float32)), rounded
    )


def _tied(case) -> bool:
    return bool(json.loads((case.checkpoint / "config.json").read_text()).get("tie_word_embeddings", False))


def nondeterministic_load(first: dict, second: dict) -> Diagnosis | None:
    """Two fresh loads of the same request, each in its own process (`weights.*` of both): parameters that
    differ between them were initialised unseeded. The protocol requires a port to be deterministic from
    the request alone; where it is not, no stage is reproducible and nothing can be re-computed from the
    weights it reported, since the next process computed with others."""

    def same(a, b) -> bool:  # NaN equals NaN in a float array; anything else compares as it is
        a, b = np.asarray(a), np.asarray(b)
        floats = np.issubdtype(a.dtype, np.floating) and np.issubdtype(b.dtype, np.floating)
        return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=floats))

    differ = sorted(k.removeprefix("weights.") for k in first.keys() & second.keys() if not same(first[k], second[k]))
    if not differ:
        return None
    return Diagnosis(
        "nondeterministic_load",
        f"two fresh loads of the same request give different values for {len(differ)} parameters "
        f"({', '.join(differ[:3])}{', …' if len(differ) > 3 else ''}): the port initialises them unseeded, so its "
        "stages are not reproducible and its forward cannot be re-computed from the weights it reported",
        {"differ": differ[:10], "count": len(differ)},
    )
