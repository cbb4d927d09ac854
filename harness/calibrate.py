"""Measure the noise each tolerance must cover: every backend against every fixture, reported as the
margin (largest error / bound, at most 1 passes) per stage, and the worst over all fixtures.

    python -m mlx_parity.harness.calibrate [FIXTURES_DIR] [--backend torch ...]
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
        worst: dict[str, tuple[float, str]] = {}
        for case in list_cases(args.root):
            for st in audit(backend, case).stages:
                top = max(st.tensors, key=lambda t: t.ratio, default=None)
                over = sum(t.mismatched for t in st.tensors)
                total = sum(t.total for t in st.tensors)
                print(
                    f"{name:6} {case.name:18} {st.name:15} {st.status:5} margin {st.margin:9.3g} "
                    f"past bound {over}/{total}  worst {top.name if top else '-'}"
                )
                if st.margin >= worst.get(st.name, (-1.0, ""))[0]:
                    worst[st.name] = (st.margin, case.name)
        for stage, (margin, fixture) in worst.items():
            print(f"{name:6} worst {stage:15} margin {margin:.3g} ({fixture})")


if __name__ == "__main__":
    main()
