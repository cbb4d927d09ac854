"""Writing named tensors: C-contiguous (safetensors' numpy writer copies raw memory, so a
Fortran-ordered array would be stored transposed) and atomic (never half written)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def save_tensors(tensors: dict[str, np.ndarray], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    save_file({k: np.array(v, order="C") for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
