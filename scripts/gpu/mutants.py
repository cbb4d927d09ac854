"""Does the GPU judgement still catch bugs? Every mutant of harness/backends/mutants.py on the fixtures built to
expose it, with the MLX reference (and so the mutant) computing on the GPU, judged as `parity audit
--device gpu [--tf32]` judges: caught (the audit fails), named (its expected cause is one of the
findings), the first failing stage.

    python3 -P scripts/gpu/mutants.py [--tf32] [--device gpu|cpu] [--json PATH]

(`-P`: the repository root holds a `mlx_parity/` stub that must not shadow the package view that
scripts/gpu/setup.sh puts on PYTHONPATH; on a machine with the project installed, plain python works.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tf32", action="store_true")
    p.add_argument("--device", default="gpu")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    from mlx_parity.harness import device as D

    dev = D.parse(a.device, a.tf32)
    if dev.name == "gpu":
        D.set_tf32_env(dev.tf32)
    D.activate(dev, ["mlx", "torch"] if dev.precision != "float32" else ["mlx"])
    from mlx_parity.harness.audit import audit
    from mlx_parity.harness.backends.mutants import MUTANTS, MutantBackend
    from mlx_parity.harness.case import FIXTURES_DIR, find_case
    from mlx_parity.harness.fixtures.truth import precision_case

    rows, started = [], time.time()
    for name, m in MUTANTS.items():
        for fixture in m.fixtures:
            case = precision_case(find_case(fixture, FIXTURES_DIR), dev.precision)
            r = audit(MutantBackend(m), case, precision=dev.precision)
            found, _ = r.findings()
            codes = [f"{f.stage}:{f.code}" for f in found]
            first = r.first_failure()
            rows.append(
                {
                    "mutant": name,
                    "fixture": fixture,
                    "expected": m.expected_diagnosis,
                    "caught": r.verdict == "fail",
                    "named": any(c.endswith(":" + m.expected_diagnosis) for c in codes),
                    "first_stage": first.name if first else None,
                    "findings": codes,
                }
            )
            print(
                f"{name:32s} {fixture:18s} {'caught' if rows[-1]['caught'] else 'MISSED':7s} "
                f"{'named' if rows[-1]['named'] else '-':6s} {rows[-1]['first_stage'] or ''}",
                flush=True,
            )
    caught = sum(r["caught"] for r in rows)
    named = sum(r["named"] for r in rows)
    print(
        f"{dev.describe()}: {caught}/{len(rows)} mutant runs caught, {named}/{len(rows)} named; {time.time() - started:.0f} s"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": dev.to_dict(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
