"""A fast BLAS for MLX on Linux CPU, bound into `libmlx.so` before MLX computes anything.

Why: the `mlx[cpu]` wheel's `libmlx.so` imports `cblas_sgemm`, `cblas_dgemm`, `cblas_cgemm` and the
LAPACK routines (`spotrf_`, ...) and finds them in the reference BLAS it bundles (plain loops: a
1024² float32 matmul runs at a few GFLOP/s instead of ~150-200).

How: `activate()` loads a fast library that exports the standard names with `RTLD_LOCAL`, then
points each of `libmlx.so`'s own import slots (its GOT entries for those symbols, found from its ELF
relocations) at the fast library's functions. Only `libmlx.so` is rebound, whether it was loaded by
`mlx.core` or by the mlx-rs extension (both load the same file): nothing else in the process sees
the library. Loading it with `RTLD_GLOBAL` (or `LD_PRELOAD`) instead would also rebind PyTorch's BLAS
imports in the same process, and that crashes: OpenBLAS 0.3.33 exports a `cblas_sgemm_batch` that
shadows MKL's differently declared one, which PyTorch's `bmm` calls. The first statement of
`reference/__init__.py` and of `harness/__init__.py` calls `activate()`, so every process of this
project gets it before any MLX work.

Which library (`PARITY_BLAS`):

- unset or `auto`: the first that loads of
  1. `ngsolve-openblas` from PyPI (a project dependency on Linux x86_64: OpenBLAS built with
     DYNAMIC_ARCH, exporting the standard unprefixed names; `scipy-openblas32` prefixes them and
     `cmeel-openblas` is built for one CPU only). Its `libgfortran.so.5` comes from the system or,
     where the system has none, from the copy PyTorch's wheel ships;
  2. Debian's OpenBLAS (`apt-get install libopenblas0-pthread`);
  3. Intel MKL from PyPI (`pip install mkl`);
- `off`: the wheel's own reference BLAS (slow; said so on stderr);
- a path to a shared library exporting the CBLAS names: that one.

Nothing falls back silently: when no fast BLAS can be used, or `PARITY_BLAS=off`, one line says so on
stderr. `active()` says what is in effect; `report()` adds the library `libmlx.so`'s `cblas_sgemm`
slot really points to (read back from its GOT and named by `dladdr`) and a measured matmul rate;
`parity bench --blas` prints it. `with reference_blas():` switches libmlx.so back to the bundled
BLAS for a block (the golden fixtures are defined under it: the same on every CPU), `with fast_blas():`
to the fast one (inside the former too). Threads: the library's own variables (`OPENBLAS_NUM_THREADS`,
`MKL_NUM_THREADS`), read when it loads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import os
import re
import struct
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

ENV = "PARITY_BLAS"
REQUIRED = ("cblas_sgemm", "cblas_dgemm", "cblas_cgemm")
# libmlx.so's imports that a BLAS/LAPACK library provides: cblas_* and the Fortran names (sgemm_, spotrf_).
_BLAS_NAME = re.compile(r"^(cblas_[a-z0-9_]+|[a-z][a-z0-9]*_)$")
DEBIAN_OPENBLAS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-serial/libopenblas.so.0",
)


@dataclass
class BlasInfo:
    """What `activate()` did: `name` of the library bound into libmlx.so (None: none), its `path`,
    `source` (how it was found), `fast` (whether MLX now calls an optimized BLAS), `bound` (how many of
    libmlx.so's imports now point at it), `config` (the library's own build string), `threads`, and
    `notes` (what was tried and why it failed)."""

    name: str | None = None
    path: str | None = None
    source: str = "none"
    fast: bool = False
    bound: int = 0
    config: str | None = None
    threads: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        if not self.fast:
            return (
                "reference BLAS bundled with the mlx wheel (slow)"
                if sys.platform.startswith("linux")
                else "platform default"
            )
        return f"{self.name} ({self.source})"


_STATE: BlasInfo | None = None
_HANDLES: list[ctypes.CDLL] = []  # kept so the libraries stay loaded
_BOUND: list[tuple] = []  # (slot address, value before binding, fast target, load base, RELRO ranges)


def _warn(message: str) -> None:
    sys.stderr.write(f"parity: WARNING: {message}\n")
    sys.stderr.flush()


def _package_dir(name: str) -> Path | None:
    """A package's folder without importing it (importing ngsolve_openblas would load it globally)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _gfortran_candidates() -> list[str]:
    torch_dir = _package_dir("torch")
    return sorted(glob.glob(str(torch_dir / "lib" / "libgfortran.so.5*"))) if torch_dir else []


def _candidates() -> list[tuple[str, str, str]]:
    """(name, source, path) in the order tried by `auto`."""
    out = []
    pkg = _package_dir("ngsolve_openblas")
    if pkg is not None:
        out += [("OpenBLAS", "PyPI ngsolve-openblas", p) for p in sorted(glob.glob(str(pkg / "libopenblas*.so*")))]
    out += [("OpenBLAS", "Debian libopenblas", p) for p in DEBIAN_OPENBLAS if os.path.exists(p)]
    lib = ctypes.util.find_library("openblas")
    if lib:
        out.append(("OpenBLAS", "system (ld.so.cache)", lib))
    out += [("MKL", "PyPI mkl", p) for p in sorted(glob.glob(str(Path(sys.prefix) / "lib" / "libmkl_rt.so*")))]
    return out


def _load(path: str, notes: list[str]) -> ctypes.CDLL | None:
    """Load `path` privately (RTLD_LOCAL); retry once with a libgfortran from PyTorch's wheel when that is
    what is missing (OpenBLAS's LAPACK part needs it; a bare system may lack it)."""
    try:
        return ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
    except OSError as e:
        first = str(e)
    if "libgfortran" in first:
        for g in _gfortran_candidates():
            try:
                _HANDLES.append(ctypes.CDLL(g, mode=ctypes.RTLD_LOCAL))
                return ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
            except OSError as e:
                first = f"{first}; with {g}: {e}"
    notes.append(f"{path}: {first}")
    return None


def _describe(handle: ctypes.CDLL, info: BlasInfo) -> None:
    try:
        f = handle.openblas_get_config
        f.restype = ctypes.c_char_p
        info.config = f().decode(errors="replace").strip()
        n = handle.openblas_get_num_threads
        n.restype = ctypes.c_int
        info.threads = int(n())
        return
    except AttributeError:
        pass
    try:
        buf = ctypes.create_string_buffer(256)
        handle.mkl_get_version_string(buf, 256)
        info.config = buf.value.decode(errors="replace").strip()
        n = handle.mkl_get_max_threads
        n.restype = ctypes.c_int
        info.threads = int(n())
    except AttributeError:
        pass


def _try(name: str, source: str, path: str, info: BlasInfo) -> bool:
    handle = _load(path, info.notes)
    if handle is None:
        return False
    missing = [s for s in REQUIRED if not hasattr(handle, s)]
    if missing:
        info.notes.append(f"{path}: does not export {', '.join(missing)} (prefixed, or not a CBLAS)")
        return False
    try:
        bound = bind_mlx(handle)
    except (OSError, ImportError, ValueError) as e:
        info.notes.append(f"{path}: could not be bound into libmlx.so: {e}")
        return False
    _HANDLES.append(handle)
    info.name, info.source, info.path, info.fast, info.bound = name, source, path, True, bound
    _describe(handle, info)
    return True


def activate() -> BlasInfo:
    """Bind a fast BLAS into libmlx.so (once per process) and return what is in effect. Loads mlx.core
    (that is, libmlx.so) to do it; the package inits of `reference` and `harness` call this first."""
    global _STATE
    if _STATE is not None:
        return _STATE
    info = BlasInfo()
    _STATE = info
    choice = os.environ.get(ENV, "auto").strip()
    if not sys.platform.startswith("linux"):
        info.source = f"{sys.platform}: MLX's own (Accelerate on macOS); {ENV} not applied"
        info.fast = sys.platform == "darwin"
        return info
    if choice.lower() in ("off", "0", "none", "reference"):
        info.source = f"{ENV}={choice}"
        _warn(
            f"{ENV}={choice}: MLX uses the reference BLAS bundled with its wheel; float32 matmuls run "
            "~30x slower than with OpenBLAS (unset it to use a fast BLAS)."
        )
        return info
    if choice.lower() not in ("", "auto"):
        if _try(Path(choice).name, f"{ENV}={choice}", choice, info):
            return info
        _warn(
            f"{ENV}={choice} could not be used ({'; '.join(info.notes)}); MLX falls back to the slow "
            "reference BLAS bundled with its wheel."
        )
        return info
    for name, source, path in _candidates():
        if _try(name, source, path, info):
            return info
    tried = "; ".join(info.notes) or "no candidate library found"
    _warn(
        "no fast BLAS found, so MLX uses the reference BLAS bundled with its wheel (float32 matmuls ~30x "
        f"slower). Tried: {tried}. Fix: `pip install ngsolve-openblas` (Linux x86_64; it needs libgfortran.so.5: "
        f"`apt-get install libgfortran5`, or torch's wheel), or `apt-get install libopenblas0-pthread`, or `pip install mkl`, "
        f"or set {ENV}=/path/to/libcblas.so."
    )
    return info


def active() -> BlasInfo:
    """What `activate()` put in place (activating now if it has not run)."""
    return activate()


# --- libmlx.so's import slots -------------------------------------------------------------------------


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _dladdr(addr: int) -> str | None:
    info = _DlInfo()
    if not ctypes.CDLL(None).dladdr(ctypes.c_void_p(addr), ctypes.byref(info)):
        return None
    return info.dli_fname.decode() if info.dli_fname else None


def _imports(lib: str) -> tuple[dict[str, list[int]], list[tuple[int, int]]]:
    """`lib`'s undefined symbols bound through GOT slots ({name: [slot address in the file's address
    space]}, from its JUMP_SLOT and GLOB_DAT relocations) and its RELRO ranges, read from its ELF headers."""
    data = Path(lib).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise OSError(f"{lib} is not a little-endian ELF64 file")
    phoff, shoff = struct.unpack_from("<QQ", data, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 0x36)
    relro = []
    for i in range(phnum):
        p_type, _, _, p_vaddr, _, _, p_memsz, _ = struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize)
        if p_type == 0x6474E552:  # PT_GNU_RELRO
            relro.append((p_vaddr, p_vaddr + p_memsz))
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    slots: dict[str, list[int]] = {}
    for sh in sections:
        if sh[1] != 4:  # SHT_RELA
            continue
        symtab = sections[sh[6]]
        strtab = sections[symtab[6]]
        for off in range(sh[4], sh[4] + sh[5], 24):
            r_offset, r_info, _ = struct.unpack_from("<QQq", data, off)
            sym, kind = r_info >> 32, r_info & 0xFFFFFFFF
            if not sym or kind not in (6, 7):  # R_X86_64_GLOB_DAT, R_X86_64_JUMP_SLOT
                continue
            st_name, _, _, st_shndx = struct.unpack_from("<IBBH", data, symtab[4] + sym * 24)
            if st_shndx != 0:  # defined here: not an import
                continue
            start = strtab[4] + st_name
            name = data[start : data.index(b"\0", start)].decode()
            slots.setdefault(name, []).append(r_offset)
    return slots, relro


def _libmlx() -> tuple[str, int]:
    """(path, load base) of the loaded libmlx.so, from /proc/self/maps (loading it through mlx.core)."""
    import mlx.core  # noqa: F401  (loads libmlx.so; it computes nothing on import)

    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[5].endswith("/libmlx.so") and int(parts[2], 16) == 0:
            return parts[5], int(parts[0].split("-")[0], 16)
    raise OSError("libmlx.so is not mapped in this process")


def _write_slot(addr: int, value: int, base: int, relro: list[tuple[int, int]]) -> None:
    if any(base + lo <= addr < base + hi for lo, hi in relro):  # read-only after relocation: open the page
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        page = os.sysconf("SC_PAGE_SIZE")
        start = addr & ~(page - 1)
        if libc.mprotect(ctypes.c_void_p(start), page, 3) != 0:  # PROT_READ | PROT_WRITE
            raise OSError(ctypes.get_errno(), "mprotect failed on libmlx.so's GOT")
        ctypes.c_void_p.from_address(addr).value = value
        libc.mprotect(ctypes.c_void_p(start), page, 1)  # PROT_READ
    else:
        ctypes.c_void_p.from_address(addr).value = value


def bind_mlx(handle: ctypes.CDLL) -> int:
    """Point every BLAS/LAPACK import slot of libmlx.so that `handle`'s library provides at it; returns
    how many symbols were rebound. Checks first that each slot still points into libmlx.so (unbound)
    or into the wheel's bundled BLAS/LAPACK, so it never overwrites something it does not understand."""
    lib, base = _libmlx()
    slots, relro = _imports(lib)
    todo = []
    for name, offsets in slots.items():
        if not _BLAS_NAME.match(name) or not hasattr(handle, name):
            continue
        target = ctypes.cast(getattr(handle, name), ctypes.c_void_p).value
        for off in offsets:
            current = ctypes.c_void_p.from_address(base + off).value
            owner = _dladdr(current) if current else None
            if owner and not (owner.endswith("/libmlx.so") or "mlx_cpu.libs" in owner or owner == _dladdr(target)):
                raise OSError(f"libmlx.so's {name} slot points into {owner}, not libmlx or its bundled BLAS")
            todo.append((base + off, target))
    if not any(n in slots for n in REQUIRED):
        raise OSError(f"{lib} imports none of {', '.join(REQUIRED)}; this MLX build needs no BLAS binding")
    for addr, target in todo:
        _BOUND.append((addr, ctypes.c_void_p.from_address(addr).value, target, base, relro))
        _write_slot(addr, target, base, relro)
    return len({a for a, _ in todo})


@contextmanager
def _calling(which: str):
    """Within the block libmlx.so's bound slots call `which` ("original": the wheel's bundled BLAS, or
    "target": the fast library); afterwards whatever they called before. Only while MLX is idle."""
    if not _BOUND:
        yield
        return
    import mlx.core as mx

    mx.synchronize()
    saved = [(addr, ctypes.c_void_p.from_address(addr).value, base, relro) for addr, _, _, base, relro in _BOUND]
    for addr, original, target, base, relro in _BOUND:
        _write_slot(addr, original if which == "original" else target, base, relro)
    try:
        yield
    finally:
        mx.synchronize()
        for addr, value, base, relro in saved:
            _write_slot(addr, value, base, relro)


def reference_blas():
    """Within this block libmlx.so calls the reference BLAS bundled with its wheel again (its slots are
    put back as they were), then the fast library. For results that must not depend on the machine:
    the reference BLAS is plain loops, the same on every CPU, while OpenBLAS picks kernels per CPU, so
    golden fixtures are built under this. Switch only while MLX is idle (between evaluations)."""
    return _calling("original")


def fast_blas():
    """Within this block libmlx.so calls the fast library, even inside `reference_blas()`; then what it
    called before. For measurements that need not be the same on every CPU: a fixture's noise spread
    (harness/fixtures/spread.py), which another BLAS path rounding differently only makes more complete."""
    return _calling("target")


def resolved(symbol: str = "cblas_sgemm") -> str | None:
    """The file whose `symbol` libmlx.so's calls really reach, read back from its GOT slot after one
    float32 matmul (so a lazily bound slot is bound); None where this cannot be read (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    import mlx.core as mx

    a = mx.ones((8, 8), dtype=mx.float32)
    mx.eval(a @ a)
    lib, base = _libmlx()
    offsets = _imports(lib)[0].get(symbol)
    if not offsets:
        return None
    target = ctypes.c_void_p.from_address(base + offsets[0]).value
    return _dladdr(target) if target else None


def measure_gflops(n: int = 1024, repeats: int = 5) -> float:
    """MLX's float32 n×n matmul rate, best of `repeats` (a sanity check of the BLAS in effect)."""
    import time

    import mlx.core as mx

    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a, b, a @ b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def report(measure: bool = True) -> dict:
    """The active BLAS as a dict, with the library libmlx.so really calls and, if asked, the rate."""
    info = active()
    out = info.to_dict()
    out["label"] = info.label()
    out["resolved_cblas_sgemm"] = resolved()
    if info.fast and out["resolved_cblas_sgemm"] and info.path:
        out["verified"] = os.path.realpath(out["resolved_cblas_sgemm"]) == os.path.realpath(info.path) or (
            Path(out["resolved_cblas_sgemm"]).name == Path(info.path).name
        )
    else:
        out["verified"] = bool(out["resolved_cblas_sgemm"]) and "mlx_cpu.libs" in (out["resolved_cblas_sgemm"] or "")
    if measure:
        out["matmul_gflops_1024"] = round(measure_gflops(), 1)
    return out
