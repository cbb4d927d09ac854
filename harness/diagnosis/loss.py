"""loss: the loss terms, solved from the port's numbers."""

from __future__ import annotations

import numpy as np

from .core import Diagnosis, cross_entropy, f64, matches


def loss(result, out, case) -> Diagnosis | None:
    ce = out.tensors.get("loss.ce")
    if ce is None or np.shape(ce) != ():
        return None
    ce, g = float(ce), case.golden
    logits, ids, mask = (
        f64(g["forward.logits"]),
        case.batch["input_ids"],
        case.batch["attention_mask"].astype(np.float64),
    )
    found = []
    # The two conventions a cross-entropy port gets wrong, solved together: which targets, which positions.
    for shift, padding in ((False, False), (True, True), (False, True)):
        lg, tg, m = (logits[:, :-1], ids[:, 1:], mask[:, 1:]) if shift else (logits, ids, mask)
        value = cross_entropy(lg, tg, np.ones_like(m) if padding else m)
        if matches(ce, value):
            evidence = {"port_ce": ce, "reference_ce": float(g["loss.ce"]), "explained_ce": value}
            if not shift:
                found.append(
                    Diagnosis(
                        "labels_not_shifted",
                        "the cross-entropy equals the unshifted one (each position predicting its own token)",
                        evidence,
                    )
                )
            if padding:
                found.append(
                    Diagnosis(
                        "padding_counted", "the cross-entropy equals the one that counts padding tokens", evidence
                    )
                )
            break
    d, gd = out.tensors.get("loss.distrust"), float(g["loss.distrust"])
    lo = case.settings.loss
    batch = len(ids)
    if d is not None and np.shape(d) == () and not matches(d, gd):
        # distrust is proportional to alpha: solve for the alpha the port's number implies
        alpha = lo.alpha * float(d) / gd if gd else float("nan")
        evidence = {"port": float(d), "reference": gd, "implied_alpha": alpha, "configured_alpha": lo.alpha}
        if np.isfinite(alpha) and alpha > 0 and not (batch > 1 and matches(float(d), batch * gd)):
            found.append(
                Diagnosis(
                    "distrust_alpha",
                    f"the distrust term implies alpha = {alpha:.4g}, not the configured {lo.alpha:g}",
                    evidence,
                )
            )
        else:
            found.append(
                Diagnosis(
                    "distrust_term",
                    "the Empirical Distrust term differs and no alpha explains it (the 1e-8 inside the log, "
                    f"or a sum where the batch mean belongs: {batch}× would be a sum)",
                    evidence,
                )
            )
    total = out.tensors.get("loss.total")
    if d is not None and total is not None and np.shape(total) == () and np.shape(d) == () and float(d) != 0:
        lam = (float(total) - ce) / float(d)  # total = ce + lambda * distrust, solved from the port's own numbers
        resolution = (
            16 * 2.0**-24 * (abs(float(total)) + abs(ce)) / abs(float(d))
        )  # float32 rounding of total and ce, through 1/d
        if abs(lam - lo.lam) > resolution + 1e-6 * abs(lo.lam):
            found.append(
                Diagnosis(
                    "distrust_lambda",
                    f"the loss implies lambda = {lam:.4g} (total = ce + lambda * distrust), not the configured {lo.lam:g}",
                    {
                        "implied_lambda": lam,
                        "configured_lambda": lo.lam,
                        "port_total": float(total),
                        "port_ce": ce,
                        "port_distrust": float(d),
                    },
                )
            )
    return found or None
