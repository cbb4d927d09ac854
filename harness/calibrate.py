"""Measure the noise each tolerance must cover: every backend against every fixture's goldens,
reported as the share of the tolerance bound used (below 1 passes) and the elements past it.

    python -m harness.calibrate [FIXTURES_DIR] [--backend torch ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .audit import audit
from .backends import get_backend
from .case import FIXTURES_DIR, list_cases


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", nargs="?", type=Path, default=FIXTURES_DIR)
    ap.add_argument("--backend", action="append", default=None)
    args = ap.parse_args(argv)
    for name in args.backend or ["torch"]:
        backend = get_backend(name)
        for case in list_cases(args.root):
            for st in audit(backend, case).stages:
                worst = max(st.tensors, key=lambda t: t.ratio, default=None)
                over = sum(t.mismatched for t in st.tensors)
                total = sum(t.total for t in st.tensors)
                print(f"{name:6} {case.name:18} {st.name:15} {st.status:5} bound used {worst.ratio if worst else 0:9.3g} "
                      f"past bound {over}/{total}  worst {worst.name if worst else '-'}")


if __name__ == "__main__":
    main()
