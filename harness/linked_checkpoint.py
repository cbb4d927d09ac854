"""A fixture whose weights stay in the user's checkpoint (`parity fixtures create --link-checkpoint`).

Real layers are large (one layer of a 70B model is 1.7 GB in bfloat16), so such a fixture stores only the
recipe of its cut (`checkpoint.json`: the source folder, the layers and vocabulary rows kept, the dtype) and
the sha256 of every tensor of the cut. The cut is made again from the source, once, into a cache folder and
checked tensor by tensor against those hashes before any audit reads it: a source that moved or changed is
refused, never silently audited.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .checkpoint_cut import slice_checkpoint

LINK_FILE = "checkpoint.json"
FORMAT = "mlx-parity-linked-checkpoint/1"


class LinkError(ValueError):
    """The linked source is absent or no longer gives the cut the fixture was built on."""


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx-parity" / "cuts"


def tensor_hashes(folder: Path) -> dict[str, str]:
    """sha256 of each tensor's dtype, shape and bytes: the content, whatever the file's header layout."""
    import mlx.core as mx

    out = {}
    for key, t in sorted(mx.load(str(folder / "model.safetensors"), format="safetensors").items()):
        h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(np.array(t.reshape(-1).view(mx.uint8)).tobytes())
        out[key] = h.hexdigest()
    return out


def _cached(tensors: dict[str, str]) -> Path:
    return cache_root() / hashlib.sha256(json.dumps(tensors, sort_keys=True).encode()).hexdigest()[:24]


def write_link(fixture: Path, cut: Path, recipe: dict) -> Path:
    """Record the recipe and the cut's hashes in the fixture, and move the cut into the cache (not into the
    fixture); returns where it now is."""
    link = {
        "format": FORMAT,
        **recipe,
        "config": json.loads((cut / "config.json").read_text()),
        "tensors": tensor_hashes(cut),
    }
    (fixture / LINK_FILE).write_text(json.dumps(link, indent=2, sort_keys=True) + "\n")
    cached = _cached(link["tensors"])
    if cached.exists():
        shutil.rmtree(cut)
    else:
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(cut), str(cached))
    return cached


def resolve(fixture: Path) -> Path:
    """The checkpoint folder of a linked fixture: its cut, made from the source when not cached, checked
    against the recorded hashes every time."""

    link = json.loads((fixture / LINK_FILE).read_text())
    if link.get("format") != FORMAT:
        raise LinkError(f"{fixture / LINK_FILE}: unknown format {link.get('format')!r}")
    cut = _cached(link["tensors"])
    if not cut.exists():
        source = Path(link["source"])
        if not (source / "config.json").exists():
            raise LinkError(
                f"{fixture.name} cuts its weights from {source}, which is not there (or has no config.json): "
                f'put the checkpoint back, or edit "source" in {fixture / LINK_FILE}'
            )
        cut.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{cut.name}-", dir=cut.parent) as tmp:
            kept = link["kept_token_ids"]
            slice_checkpoint(
                source,
                Path(tmp) / "cut",
                link["layers"],
                None if kept is None else np.asarray(kept, np.int64),
                link["dtype"],
            )
            os.replace(Path(tmp) / "cut", cut)
    hashes = tensor_hashes(cut)
    changed = sorted(k for k, h in hashes.items() if link["tensors"].get(k) != h)
    missing = sorted(set(link["tensors"]) - set(hashes))
    if json.loads((cut / "config.json").read_text()) != link["config"]:
        changed.insert(0, "config.json")
    if changed or missing:
        shutil.rmtree(cut, ignore_errors=True)  # a stale or tampered cut is made again next time
        raise LinkError(
            f"{fixture.name}: the cut of {link['source']} is not the one the fixture was built on "
            f"({len(changed)} tensors differ, {len(missing)} absent, e.g. {(changed or missing)[0]}): "
            f"the source checkpoint changed; create the fixture again"
        )
    return cut
