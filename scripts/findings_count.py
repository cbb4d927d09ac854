"""How often each finding's code occurs when one backend is audited on every bundled fixture: a port's
table of named causes, before and after a change to the diagnosis.

    python scripts/findings_count.py BACKEND [--eight] [--json PATH]

BACKEND is any `parity audit -b` name (`cmd:./my-adapter`, `mutant:no_shift`, `mlx-rs-bin`); `--eight`
audits the eight core stages only, as for a port that answers no isolated request.
"""

from __future__ import annotations

import argparse
import collections
import json

from mlx_parity.harness.audit import audit
from mlx_parity.harness.backends import get_backend
from mlx_parity.harness.case import FIXTURES_DIR, list_cases
from mlx_parity.harness.stages import ALL_STAGES, STAGES


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("backend")
    ap.add_argument("--eight", action="store_true", help="the eight core stages only")
    ap.add_argument("--json", help="write every fixture's findings and the counts here")
    a = ap.parse_args(argv)
    backend, stages = get_backend(a.backend), STAGES if a.eight else ALL_STAGES
    rows, count = {}, collections.Counter()
    for case in list_cases(FIXTURES_DIR):
        found, inherited = audit(backend, case, stages).findings()
        rows[case.name] = [{"stage": f.stage, "code": f.code, "summary": f.summary} for f in found]
        count.update({f.code for f in found})
        print(f"{case.name:18s} {', '.join(f'{f.stage}:{f.code}' for f in found) or 'pass'}", flush=True)
    print("\nfixtures per code:")
    for code, n in count.most_common():
        print(f"  {code:32s} {n}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"backend": a.backend, "stages": list(stages), "fixtures": rows, "codes": count}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
