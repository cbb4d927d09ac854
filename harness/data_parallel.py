"""The data-parallel audit (`parity audit --world-size N`): a backend's N ranks, started by its engine's own
launcher, judged as the one process they must equal (docs/training-step.md, data parallelism).

N ranks of A micro-batches are one process of N·A micro-batches. That process is not the fixture's (it has A),
so its goldens and float64 truth are built now, from the fixture's checkpoint, batch and settings with
`accum_steps` = N·A, by the same code that builds a fixture's (harness/fixtures/build.py). Rank 0's first update
is judged as the optimizer stage and its last as the trajectory stage, with their tolerances; every other rank
must hold what rank 0 holds, bit for bit.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from .audit import FAIL, NOT_CHECKED, PASS, AuditResult, StageResult, audit, diagnose_stage
from .backends.base import Backend, Ranks
from .case import Case
from .compare import TensorResult, compare_group, forward_mask
from .diagnosis import Diagnosis
from .findings import NOT_IMPLEMENTED
from .protocol.client import set_stages, write_request
from .stages import ALL_STAGES, LAUNCHED_STAGES, PREFIX, REGISTRY, StageOutput, Unsupported
from .tolerances import precision_tolerance, tolerance

(STAGE,) = LAUNCHED_STAGES
JUDGED = REGISTRY[STAGE].consumes  # rank 0 is judged as these stages of the one process
# What a rank holds after the last update beyond the trajectory stage's outputs: compared across ranks only.
HELD_ONLY = ("trajectory.m.", "trajectory.v.", "trajectory.step")
DEFAULT_TIMEOUT_S = 600


class LaunchError(RuntimeError):
    pass


def not_applicable(case: Case, world: int) -> str | None:
    """Why `case` cannot be trained on `world` ranks, or None."""
    rows, accum = int(case.batch["input_ids"].shape[0]), case.settings.accum_steps
    if rows % (world * accum):
        return f"its batch of {rows} row{'s' * (rows != 1)} does not divide into {world} ranks × {accum} micro-batches"
    return None


# Built once per process and inputs: every data-parallel audit of a fixture on N ranks (each backend, each
# mutant) is judged against the same one process; the folders go when the process ends.
_ONE_PROCESS: dict[tuple, tuple[tempfile.TemporaryDirectory, Path]] = {}


def _inputs(case: Case, world: int) -> tuple:
    """What the one process is built from, each file by size and modification time: a change builds it again."""
    files = [case.path / n for n in ("batch.safetensors", "settings.json", "case.json") if (case.path / n).exists()]
    files += [case.lora_init] if case.lora_init is not None else []
    files += sorted(case.checkpoint.resolve().iterdir())
    return (str(case.path.resolve()), world, *((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


def one_process_case(case: Case, world: int, progress=None) -> Case:
    """The one process that `world` ranks must equal: `case` with `accum_steps` × `world`, its goldens and truth
    built the first time they are asked for (seconds on the bundled fixtures)."""
    key = _inputs(case, world)
    if key not in _ONE_PROCESS:
        tmp = tempfile.TemporaryDirectory(prefix="parity-dp-")
        path = Path(tmp.name) / f"{case.name}-x{world}"
        path.mkdir()
        (path / "checkpoint").symlink_to(case.checkpoint.resolve())
        (path / "batch.safetensors").symlink_to((case.path / "batch.safetensors").resolve())
        if case.lora_init is not None:
            (path / "lora_init.safetensors").symlink_to(case.lora_init.resolve())
        info = case.info | {"name": path.name, "description": f"{case.name} as one process of {world} ranks"}
        (path / "case.json").write_text(json.dumps(info, indent=2) + "\n")
        settings = case.settings_dict | {"accum_steps": case.settings.accum_steps * world}
        (path / "settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        from .fixtures.build import build_goldens  # here: the goldens need the twin (torch), the wheel alone has none

        build_goldens(Case(path), require_agreement=False, progress=progress, audit_backends=False)
        _ONE_PROCESS[key] = (tmp, path)
    return Case(_ONE_PROCESS[key][1])


def _free_ports(n: int) -> int:
    """A first port from which `n` consecutive ones are free now (the ring backend listens on port + rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + n < 65536 and all(_free(first + i) for i in range(n)):
            return first
    raise LaunchError(f"no {n} consecutive free ports on this machine")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def launcher_command(ranks: Ranks, world: int) -> list[str]:
    """The engine's own launcher for `world` local ranks of `ranks.command` (CPU: MLX's ring, torch's gloo)."""
    bin_dir = Path(sys.executable).parent
    if ranks.launcher == "mlx":  # no --python: the command runs as given, with MLX_RANK and MLX_HOSTFILE set
        port = str(_free_ports(world))
        return [str(bin_dir / "mlx.launch"), "--backend", "ring", "-n", str(world), "--starting-port", port, "--"]
    if ranks.launcher == "torch":  # --standalone: a free rendezvous port, so audits side by side never collide
        return [str(bin_dir / "torchrun"), "--standalone", "--nproc-per-node", str(world), "--no-python"]
    raise LaunchError(f"unknown launcher {ranks.launcher!r}: mlx or torch")


def launch(ranks: Ranks, case: Case, world: int, out: Path, timeout: float = DEFAULT_TIMEOUT_S) -> list[dict]:
    """Each rank's outputs, after the launcher ran `world` ranks of `ranks` on `case` (working under `out`).
    Raises Unsupported with the port's reason when a protocol port answers that it trains on one process."""
    if ranks.protocol:
        request, written = out / "request", out / "response"
        write_request(case, request)
        set_stages(request, case, [STAGE], world, ranks.launcher)
        written.mkdir()
        args, files = [str(request), str(written)], [written / f"{STAGE}.rank{r}.safetensors" for r in range(world)]
    else:
        written = out / "ranks"
        args = [str(case.checkpoint), str(case.path / "batch.safetensors"), str(case.path / "settings.json")]
        args += [str(written)] + (["--lora-init", str(case.lora_init)] if case.lora_init is not None else [])
        files = [written / f"rank{r}.safetensors" for r in range(world)]
    cmd = [*launcher_command(ranks, world), *ranks.command, *args]
    # N ranks share the cores; the launchers' own scratch files (mlx.launch's per-rank pid and host files,
    # torchrun's torchelastic_* folders, which neither removes) go under `out`, deleted with it
    scratch = out / "tmp"
    scratch.mkdir(exist_ok=True)
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TMPDIR": str(scratch)}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"{world} ranks did not finish in {timeout:.0f} s: {shlex.join(cmd)}") from None
    if ranks.protocol and (written / f"{STAGE}.unsupported").exists():
        raise Unsupported((written / f"{STAGE}.unsupported").read_text(errors="replace").strip()[:2000])
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-12:])
    if done.returncode != 0:
        raise LaunchError(f"the ranks exited with {done.returncode}: {shlex.join(cmd)}\n{tail}")
    missing = [f.name for f in files if not f.exists()]
    if missing:  # mlx.launch exits 0 when a rank fails before it connects
        raise LaunchError(f"the ranks wrote no {', '.join(missing)}: {shlex.join(cmd)}\n{tail}")
    return [load_file(str(f)) for f in files]


def judge_ranks(outputs: list[dict], one: Case, precision: str = "float32") -> tuple[list[TensorResult], str]:
    """Rank 0 judged as the one process's optimizer and trajectory stages; a message naming the first tensor
    where another rank holds something else (ranks must agree bit for bit), or ''."""
    tensors = []
    judged = {k: v for k, v in outputs[0].items() if not k.startswith(HELD_ONLY)}
    for stage in JUDGED:
        tol = precision_tolerance(tolerance(stage, one.settings.precision), precision)
        prefix = PREFIX[stage]
        tensors += compare_group(judged, prefix, one, prefix, tol, mask_for=forward_mask(one))
    return tensors, ranks_differ(outputs)


def ranks_differ(outputs: list[dict]) -> str:
    for r, other in enumerate(outputs[1:], start=1):
        for k in sorted(outputs[0].keys() | other.keys()):
            a, b = outputs[0].get(k), other.get(k)
            if a is None or b is None or a.shape != b.shape or not np.array_equal(a, b):
                diff = "" if a is None or b is None or a.shape != b.shape else f" (max |Δ| {np.abs(a - b).max():.3g})"
                return f"rank {r} holds another {k} than rank 0{diff}: ranks must agree bit for bit"
    return ""


def audit_stage(
    backend: Backend, case: Case, world: int, precision: str = "float32", progress=None, timeout=DEFAULT_TIMEOUT_S
) -> StageResult:
    """The data_parallel stage of `backend` on `world` ranks: not checked when the batch does not divide or the
    backend has no launch; failed with the launcher's output when the ranks fail; otherwise judged, and
    diagnosed (harness/diagnosis/data_parallel.py) when it fails."""
    accum = case.settings.accum_steps
    res = StageResult(
        STAGE,
        NOT_CHECKED,
        tolerance=f"rank 0 as one process of {world} × {accum} micro-batches, by the optimizer and trajectory "
        "stages' tolerances; the other ranks bit for bit",
    )
    ranks = backend.ranks
    if ranks is None:
        res.message = f"{backend.name} has no data-parallel launch (docs/training-step.md, data parallelism)"
        return res
    if precision != "float32":
        res.message = "the ranks run on the CPU (MLX's ring, torch's gloo): judged with float32 matmuls only"
        return res
    reason = not_applicable(case, world)
    if reason:
        res.message = reason
        return res
    res.status = FAIL
    one = one_process_case(case, world, progress)
    with tempfile.TemporaryDirectory(prefix="parity-ranks-") as tmp:
        if progress:
            progress(f"{backend.name}: {world} ranks")
        try:
            outputs = launch(ranks, case, world, Path(tmp), timeout)
        except Unsupported as e:
            res.status, res.message = NOT_CHECKED, f"{NOT_IMPLEMENTED}: {e}"
            return res
        except LaunchError as e:
            res.message = str(e)
            res.diagnoses = [Diagnosis("stage_error", str(e).splitlines()[0][:300], {"error": str(e)[-2000:]})]
            res.diagnosis = res.diagnoses[0]
            return res
        res.tensors, res.message = judge_ranks(outputs, one, precision)
        res.status = PASS if res.tensors and not res.failures and not res.message else FAIL
        if res.status == FAIL:
            res.message = res.message or res.worst().describe()
            every = {f"rank{r}.{k}": v for r, o in enumerate(outputs) for k, v in o.items()}
            try:
                res.diagnoses = diagnose_stage(res, StageOutput(every, meta={"world": world}), one)
            except Exception as e:  # a rule that raises reports itself, never kills the audit
                res.diagnoses = [
                    Diagnosis("diagnosis_failed", f"the data_parallel rule raised {type(e).__name__}: {e}")
                ]
            res.diagnosis = res.diagnoses[0]
    return res


def audit_world(
    backend: Backend, case: Case, world: int = 1, stages=ALL_STAGES, precision: str = "float32", progress=None
) -> AuditResult:
    """`audit`, and with `world` > 1 the data_parallel stage after the others."""
    result = audit(backend, case, stages, precision)
    if world > 1:
        result.stages.append(audit_stage(backend, case, world, precision, progress))
    return result
