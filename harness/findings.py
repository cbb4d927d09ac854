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

from .stages import REGISTRY
from .stages.checkpoint import RESUMED

# From the stage registry: what each stage consumes (transitively closed below), the isolated check that
# repeats another, and each stage's isolated twin.
_CONSUMES = {n: s.consumes for n, s in REGISTRY.items()}
_ISOLATED_AFTER = {n: s.repeats for n, s in REGISTRY.items() if s.repeats}
ISOLATED_BY = {n: s.isolated_by for n, s in REGISTRY.items() if s.isolated_by}
# Causes about which tensors exist or move at all, not about their values: no upstream difference makes
# gradients vanish or an update stay put, so these are findings whatever failed before them.
STRUCTURAL = {"no_gradients", "zero_gradients", "trainable_set_mismatch", "no_update", "optimizer_not_connected"}
# A stage the port does not implement (a core request answered `.unsupported`) or reports an error for:
# no upstream difference in numbers explains a missing feature or the port's own refusal, so it is always a
# finding of its own (a port that saves no checkpoint, say).
NOT_IMPLEMENTED = "not implemented by the backend"


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
    # the stage's own isolated check ran and passed (or it is an isolated check): the piece is clean and the
    # failure follows from its inputs; False: nothing isolated it, so it only may follow from them
    isolated: bool = True

    def describe(self) -> str:
        origin = ", ".join(self.from_stages)
        return f"follows from {origin}" if self.isolated else f"may follow from {origin} (not isolated)"

    def to_dict(self) -> dict:
        return asdict(self)


def _findings(st) -> list[Finding]:
    w = st.worst()
    piece = w.name if w is not None else st.name
    if not st.diagnoses:
        return [Finding(st.name, piece, "error", st.message)]
    return [
        Finding(st.name, ", ".join(d.pieces) if d.pieces else piece, d.code, d.summary, d.evidence)
        for d in st.diagnoses
    ]


def _unloaded(stages) -> set[str]:
    """Parameter names whose loaded value differs from the checkpoint (weight_mapping's failures)."""
    wm = next((s for s in stages if s.name == "weight_mapping"), None)
    if wm is None or wm.status != "fail":
        return set()
    # and those a loading cause names as its own: a separate head where the config ties it (the head and the
    # embedding it should be are trained apart where the reference trains one)
    named = {p for d in wm.diagnoses if d.code == "tied_embeddings_ignored" for p in d.parameters}
    failed = {t.name.removeprefix("weights.") for t in wm.tensors if not t.passed}
    return (failed | named) or {""}  # no tensor named: every parameter suspect


def _reads_unloaded(d, unloaded: set[str], stage: str) -> bool:
    """`parameters` are the prefixes of what a cause's evidence reads ("" for all of them); an update no
    rule explains may come from any parameter."""
    if d.code == "trainable_set_mismatch":
        return _odd_tensors_unloaded(d, unloaded)
    reads = [""] if d.code == "unexplained" and stage in ("isolated_optimizer", "isolated_schedule") else d.parameters
    return any(u.startswith(p) for p in reads for u in unloaded)


def _follows_structurally(name: str, structural, by_name, failed) -> bool:
    """A structural cause that an upstream one explains: no update after no gradients, a different
    trainable set after a different set of loaded parameters."""
    for up in upstream(name):
        if up not in failed:
            continue
        codes = {d.code for d in by_name[up].diagnoses}
        if codes & STRUCTURAL:
            return True
        if (
            up == "weight_mapping"
            and {d.code for d in structural} == {"trainable_set_mismatch"}
            and codes & {"key_mapping", "tied_embeddings_ignored", "checkpoint_tensors_unused", "lora_adapters_missing"}
            and all(_odd_tensors_unloaded(d, _unloaded([by_name["weight_mapping"]])) for d in structural)
        ):
            return True
    return False


def _odd_tensors_unloaded(d, unloaded: set[str]) -> bool:
    """A trainable set follows from the loading only when every tensor it differs in is one that did not
    load (or every parameter is suspect): a key mismatch elsewhere explains nothing about the others."""
    odd = set(d.evidence.get("absent", [])) | set(d.evidence.get("extra", []))
    return "" in unloaded or bool(odd) and odd <= unloaded


def _forward_pieces_note(iso) -> str:
    """What the isolated forward check said about an end-to-end forward divergence: only a check that ran
    can have named the piece."""
    if iso is None or iso.status not in ("pass", "fail"):
        return (
            "; no cause is named: no convention re-computed from the port's own input and weights reproduces "
            "that layer, and the port does not answer the isolated forward check (`isolated_forward`, "
            "docs/protocol.md), which solves each piece on the reference's inputs"
        )
    if iso.status == "fail":
        return "; the isolated forward check's findings name the pieces"
    return "; every piece agrees on the reference's own inputs: the chain between them differs"


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
        if st.message.startswith(NOT_IMPLEMENTED) or any(d.code == "stage_error" for d in st.diagnoses):
            findings += _findings(st)
            roots[name] = [name]
            continue
        if name == "checkpoint" and any(t.name.endswith(RESUMED) and not t.passed for t in st.tensors):
            findings += _findings(st)  # a resume that differs from the backend's own run: its own bug
            roots[name] = [name]
            continue
        if name.startswith(
            "isolated_"
        ):  # each cause on its own: inherited only where it reads a parameter that did not load
            unloaded = _unloaded(stages)
            before = _ISOLATED_AFTER.get(name)
            follows = before in failed  # an update no convention explains after a first update that already failed
            own, origin = [], []
            for f, d in zip(_findings(st), st.diagnoses or [None]):
                if d is not None and _reads_unloaded(d, unloaded, name):
                    origin.append("weight_mapping")
                elif d is not None and follows and d.code == "unexplained":
                    origin += roots.get(before, [before])
                else:
                    own.append(f)
            findings += own
            if origin:
                inherited.append(Inherited(name, list(dict.fromkeys(origin))))
            roots[name] = [name] if own else list(dict.fromkeys(origin))
            continue
        proven = [d for d in st.diagnoses if d.evidence.get("from_port_inputs")]
        if proven and ISOLATED_BY.get(name) not in failed:
            # re-computed from the port's own inputs and weights: nothing upstream explains it (where the
            # isolated check failed, that check, on the reference's inputs, holds the finding instead)
            findings += [f for f, d in zip(_findings(st), st.diagnoses) if d in proven]
            roots[name] = [name]
            continue
        structural = [d for d in st.diagnoses if d.code in STRUCTURAL]
        if structural and not _follows_structurally(name, structural, by_name, failed):
            findings += [f for f, d in zip(_findings(st), st.diagnoses) if d.code in STRUCTURAL]
            roots[name] = [name]
            continue
        causes = [s for s in upstream(name) if s in failed]
        iso = ISOLATED_BY.get(name)
        if iso in failed:
            causes.append(iso)
        if causes:
            origin = list(dict.fromkeys(r for c in causes for r in roots.get(c, [c])))
            checked = by_name.get(iso) is not None and by_name[iso].status in ("pass", "fail")
            inherited.append(Inherited(name, origin, isolated=checked))
            roots[name] = origin
        else:
            findings += _findings(st)
            roots[name] = [name]
    position = {s.name: i for i, s in enumerate(stages)}
    findings.sort(key=lambda f: position.get(f.stage, 0))
    merged: dict[str, Finding] = {}  # one cause seen by two checks (a stage and its isolated check) is one finding
    for f in findings:
        if f.code in merged and f.code not in (
            "unexplained",
            "error",
            "stage_error",
            "diagnosis_failed",
            "forward_divergence",
        ):
            merged[f.code].evidence = merged[f.code].evidence | {
                "also_seen_at": merged[f.code].evidence.get("also_seen_at", []) + [f.stage]
            }
        else:
            merged.setdefault(
                f.code
                if f.code not in ("unexplained", "error", "stage_error", "diagnosis_failed", "forward_divergence")
                else f"{f.code}@{f.stage}",
                f,
            )
    findings = list(merged.values())
    for f in findings:
        if f.code == "forward_divergence":
            f.summary += _forward_pieces_note(by_name.get("isolated_forward"))
    inherited.sort(key=lambda i: position.get(i.stage, 0))
    return findings, inherited
