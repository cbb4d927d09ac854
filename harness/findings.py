"""Findings, not cascades: the distinct problems one audit shows, each with the stage and the smallest
piece it was isolated to, its cause and evidence; failures that follow from an earlier one are marked
as inherited rather than reported again.

A stage's failure is inherited when a stage it consumes failed and its own isolated check (the same
piece on the reference's inputs) passed: the piece is clean, its inputs were not. A failing isolated
check is a finding of its own unless what it consumes failed (the isolated optimizer updates the
parameters the port loaded). Inherited failures name the findings they follow from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# What each stage consumes (transitively closed below).
_CONSUMES = {
    "weight_mapping": (),
    "forward": ("weight_mapping",),
    "shifted_slices": (),
    "loss": ("forward", "shifted_slices"),
    "gradients": ("loss",),
    "optimizer": ("gradients",),
    "trajectory": ("optimizer",),
    "checkpoint": ("trajectory",),
    "isolated_loss": (),
    "isolated_optimizer": ("weight_mapping",),  # it updates the parameters the port loaded
}
ISOLATED_BY = {"loss": "isolated_loss", "optimizer": "isolated_optimizer"}
RESUME_SUFFIX = "(resumed vs own uninterrupted run)"


def upstream(stage: str) -> list[str]:
    seen: list[str] = []
    todo = list(_CONSUMES.get(stage, ()))
    while todo:
        s = todo.pop()
        if s not in seen:
            seen.append(s)
            todo.extend(_CONSUMES.get(s, ()))
    return seen


@dataclass
class Finding:
    stage: str
    piece: str  # the smallest piece it was isolated to: a tensor (layer, parameter) or the stage
    code: str
    summary: str
    evidence: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Inherited:
    stage: str
    from_stages: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def _finding(st) -> Finding:
    w = st.worst()
    piece = w.name if w is not None else st.name
    d = st.diagnosis
    if d is None:
        return Finding(st.name, piece, "error", st.message)
    return Finding(st.name, piece, d.code, d.summary, d.evidence)


def analyse(stages) -> tuple[list[Finding], list[Inherited]]:
    """Distinct findings and inherited failures of one audit's stage results."""
    by_name = {s.name: s for s in stages}
    failed = {s.name for s in stages if s.status == "fail"}
    findings: list[Finding] = []
    inherited: list[Inherited] = []
    roots: dict[str, list[str]] = {}  # failing stage -> the findings it follows from (itself if one)
    order = [s for s in _CONSUMES if s in by_name] + [s.name for s in stages if s.name not in _CONSUMES]
    order = sorted(order, key=lambda n: 0 if n.startswith("isolated_") else 1)  # isolated checks explain the others
    for name in order:
        st = by_name[name]
        if st.status != "fail":
            continue
        if name == "checkpoint" and any(t.name.endswith(RESUME_SUFFIX) and not t.passed for t in st.tensors):
            findings.append(_finding(st))  # a resume that differs from the backend's own run: its own bug
            roots[name] = [name]
            continue
        causes = [s for s in upstream(name) if s in failed]
        iso = ISOLATED_BY.get(name)
        if iso in failed:
            causes.append(iso)
        if causes:
            origin = list(dict.fromkeys(r for c in causes for r in roots.get(c, [c])))
            inherited.append(Inherited(name, origin))
            roots[name] = origin
        else:
            findings.append(_finding(st))
            roots[name] = [name]
    position = {s.name: i for i, s in enumerate(stages)}
    findings.sort(key=lambda f: position.get(f.stage, 0))
    merged: dict[str, Finding] = {}  # one cause seen by two checks (a stage and its isolated check) is one finding
    for f in findings:
        if f.code in merged and f.code not in ("unexplained", "error", "stage_error", "diagnosis_failed", "forward_divergence"):
            merged[f.code].evidence = merged[f.code].evidence | {"also_seen_at": merged[f.code].evidence.get("also_seen_at", []) + [f.stage]}
        else:
            merged.setdefault(f.code if f.code not in ("unexplained", "error", "stage_error", "diagnosis_failed", "forward_divergence")
                              else f"{f.code}@{f.stage}", f)
    findings = list(merged.values())
    inherited.sort(key=lambda i: position.get(i.stage, 0))
    return findings, inherited
