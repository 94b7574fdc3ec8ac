"""The native CPU decode kernels: ``atskv::paged_attention`` (``csrc/paged_attention.cpp``),
``atskv::rank_pages`` and ``atskv::paged_decode`` (``csrc/rank_pages.cpp``).

One decode query step's exact attention over a static ragged KV store (:class:`StaticKV`,
:class:`StaticPagedKV`), reading the chosen pages' rows where they lie. PyTorch's CPU path has no
such kernel: a selection method had to gather its pages into a fresh buffer and run SDPA over it,
which at 4096 tokens cost more than reading every page (the gather copy, then the mask). On the CPU
every static store of every method attends through this one kernel (the full cache and
sliding_window included: it is also faster than SDPA over a dense, masked store), so that methods
differ in what they read, not in how; elsewhere (CUDA, other dtypes) the stores keep their
PyTorch code, which is also the reference the tests compare the kernel with.

``atskv::rank_pages`` is atskv's decode-time page ranking (:meth:`ATSKV.rank_pages`, its
reference) in one pass per head: compiled PyTorch runs it as a chain of small kernels, which cost
atskv more per step than its attention saved over sliding_window's. ``atskv::paged_decode`` is
atskv's whole decode layer in one call (:meth:`StaticPagedKV.decode_ranked`): the append with
the page summaries' update, the ranking and the attention.

The kernels are compiled on first use (about 15 s with g++ and ninja, cached under
``$ATSKV_CACHE/kernels``; ``-march=native``, so the cache is keyed by this CPU's flags).
``ATSKV_CPU_KERNEL=0`` turns them all off, for an A/B or a machine without a compiler; if they
cannot be built, a warning says why and the PyTorch paths run. :func:`status` says which ran.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import warnings
from pathlib import Path

import torch
from torch import Tensor

from atskv.core.paths import cache_root
from atskv.core.types import ConfigError

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in ("paged_attention.cpp", "rank_pages.cpp", "linear_rows.cpp")]
NAME = "atskv::paged_attention, atskv::rows_decode, atskv::paged_decode, atskv::linear_rows"
_loaded: bool | None = None  # None: not tried yet
_reason = "not tried"


ON = ("1", "true", "yes", "on", "")
OFF = ("0", "false", "no", "off")
#: ``ATSKV_CPU_KERNEL=no-avx512``: built for this CPU without AVX-512, so that a machine with it
#: also checks the code path every other x86-64 CPU runs
NO_AVX512 = "no-avx512"


def _switch() -> str:
    value = os.environ.get("ATSKV_CPU_KERNEL", "1").strip().lower()
    if value not in (*ON, *OFF, NO_AVX512):
        raise ConfigError(f"ATSKV_CPU_KERNEL={value!r}: use 1 (the default), 0 (off) or "
                          f"{NO_AVX512} (built without AVX-512)")
    return value


def enabled() -> bool:
    """Whether ``ATSKV_CPU_KERNEL`` allows the kernels (default: yes)."""
    return _switch() not in OFF


def cflags() -> list[str]:
    """The compiler flags: optimised for this CPU, less AVX-512 with ``ATSKV_CPU_KERNEL=no-avx512``
    (on x86-64; other machines have none to leave out)."""
    flags = ["-O3", "-march=native", "-fopenmp"]
    if _switch() == NO_AVX512 and platform.machine() in ("x86_64", "AMD64"):
        flags.append("-mno-avx512f")
    return flags


def _build_dir() -> Path:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        flags = platform.processor()
    sources = b"".join(path.read_bytes() for path in sorted(CSRC.iterdir()))  # headers too
    key = f"{torch.__version__}|{platform.machine()}|{flags}|{cflags()}|{sources!r}"
    return cache_root() / "kernels" / hashlib.sha1(key.encode()).hexdigest()[:12]


def _ninja_on_path() -> None:
    """torch's extension builder runs ``ninja`` from PATH: add the PyPI wheel's, if installed."""
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"


def load() -> bool:
    """Build (once per machine) and load the kernel; ``False``, with a warning, if it cannot be."""
    global _loaded, _reason
    if _loaded is not None:
        return _loaded
    if not enabled():
        _loaded, _reason = False, "off (ATSKV_CPU_KERNEL=0)"
        return False
    try:
        from torch.utils.cpp_extension import load as load_extension

        _ninja_on_path()
        build = _build_dir()
        build.mkdir(parents=True, exist_ok=True)
        load_extension("atskv_kernels", [str(s) for s in SOURCES], build_directory=str(build),
                       extra_cflags=cflags(),
                       extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        torch.library.register_fake("atskv::paged_attention")(_shape)
        torch.library.register_fake("atskv::rank_pages")(_rank_shape)
        torch.library.register_fake("atskv::paged_decode")(_decode_shape)
        torch.library.register_fake("atskv::linear_rows")(_linear_shape)
        torch.library.register_fake("atskv::rows_decode")(_rows_shape)
    except Exception as exc:  # a missing compiler or ninja: run the PyTorch path, say so
        _loaded, _reason = False, f"unavailable ({type(exc).__name__}: {exc})"
        warnings.warn(f"atskv: the CPU decode kernels could not be built, decoding uses PyTorch "
                      f"(SDPA, atskv's reference ranking) instead: {exc}", stacklevel=2)
        return False
    _loaded, _reason = True, NAME + (f" ({NO_AVX512})" if _switch() == NO_AVX512 else "")
    log.info("CPU decode kernels: %s (built in %s)", NAME, build)
    return True


def _shape(q: Tensor, k: Tensor, v: Tensor, offsets: Tensor | None, lens: Tensor,
           pages: Tensor | None, chosen: Tensor | None, page: int, scale: float) -> Tensor:
    return q.new_empty(q.shape)


def _rank_shape(q: Tensor, kmin: Tensor, kmax: Tensor, ksum: Tensor, lens: Tensor,
                pinned: Tensor, page: int, max_pages: int, fit_pages: int, min_pages: int,
                mass: float, scale: float) -> tuple[Tensor, Tensor]:
    k = page_slots(max_pages, fit_pages, pinned.shape[1])
    return (q.new_empty((q.shape[0], k), dtype=torch.long),
            q.new_empty((q.shape[0], k), dtype=torch.bool))


def _decode_shape(q: Tensor, knew: Tensor, vnew: Tensor, k: Tensor, v: Tensor, summary: Tensor,
                  index: Tensor, pinned: Tensor, page: int, max_pages: int, fit_pages: int,
                  min_pages: int, mass: float, scale: float) -> Tensor:
    return q.new_empty(q.shape)


def _rows_shape(q: Tensor, knew: Tensor, vnew: Tensor, rows: list[int], k: list[Tensor],
                v: list[Tensor], index: list[Tensor], sinks: list[int], page: int,
                scale: float) -> Tensor:
    return q.new_empty((len(rows), *q.shape[1:]))


def _linear_shape(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


def page_slots(max_pages: int, fit_pages: int, n_pages: int) -> int:
    """The page slots per head atskv's ranking returns (:func:`rank_pages`, and its reference
    ``ATSKV.rank_pages``): room for every page of a head it does not rank (at most
    ``fit_pages``) and for the ``max_pages`` of one it does, at most ``n_pages``. A symbolic min:
    no guard on ``n_pages`` in a compiled step."""
    return torch.sym_min(max(max_pages, fit_pages), n_pages)


def usable(t: Tensor) -> bool:
    """Whether attention over a store of ``t``'s device and dtype runs the kernel (builds it on
    first call: call it when a store is made, never inside a compiled step)."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and load()


def status() -> str:
    """The CPU decode kernels in use: their names, or why PyTorch's code (SDPA, atskv's reference
    ranking) runs."""
    return _reason if _loaded is not None else "not used yet"


def paged_attention(q: Tensor, k: Tensor, v: Tensor, offsets: Tensor | None, lens: Tensor,
                    pages: Tensor | None, chosen: Tensor | None, page: int,
                    scale: float) -> Tensor:
    """Attention of ``q`` ``(H, g, d)`` over head ``h``'s rows ``offsets[h] ..
    offsets[h] + lens[h]`` of ``k``, ``v`` ``(N, d)`` (or, without offsets, rows ``0 ..
    min(lens[h], C)`` of ``k[h]``, ``v[h]`` ``(H, C, d)``): the ``page``-row pages
    ``pages[h, i]`` where ``chosen[h, i]`` (every page when ``pages`` is None); ``(H, g, d)``."""
    return torch.ops.atskv.paged_attention(q, k, v, offsets, lens, pages, chosen, page, scale)


def rows_decode(q: Tensor, knew: Tensor, vnew: Tensor, rows: list[int], k: list[Tensor],
                v: list[Tensor], index: list[Tensor], sinks: list[int], page: int,
                scale: float) -> Tensor:
    """One layer's decode step for the rows ``rows`` of a step (sequences of a batch) whose layer
    is an append and exact attention over their own static store, in one call, in place: the
    ``b``-th such row's new ``knew[rows[b]]``, ``vnew[rows[b]]`` ``(H, d)`` go to each head's next
    row of ``k[b]``, ``v[b]`` and its
    count in ``index[b]`` grows by one (a :class:`StaticKV`'s ``(H, C, d)`` buffers with its counts
    ``(H,)``, a ring's (``sinks[b] >= 0``) overwriting its oldest row after the sinks once full,
    or a :class:`StaticPagedKV`'s ``(N, d)`` rows with its ``(3, H)`` index); then each
    row's :func:`paged_attention` over every row of its store in blocks of ``page``, the threads
    dealt over all rows' heads at once. Each row gets what :func:`paged_attention` gives it alone.
    ``q`` ``(n, H, g, d)`` -> ``(len(rows), H, g, d)``."""
    return torch.ops.atskv.rows_decode(q, knew, vnew, rows, k, v, index, sinks, page, scale)


def rank_pages(q: Tensor, kmin: Tensor, kmax: Tensor, ksum: Tensor, lens: Tensor, pinned: Tensor,
               page: int, max_pages: int, fit_pages: int, min_pages: int, mass: float,
               scale: float) -> tuple[Tensor, Tensor]:
    """atskv's page ranking (:meth:`ATSKV.rank_pages`, which documents it) for ``q`` ``(H, g, d)``
    over page summaries ``(H, P, d)``: the ``min(max(max_pages, fit_pages), P)`` best page slots
    per head, in slot order (so that attention reads the store front to back), and which of them
    to attend (every page of a head holding at most ``fit_pages``, unranked)."""
    return torch.ops.atskv.rank_pages(q, kmin, kmax, ksum, lens, pinned, page, max_pages,
                                      fit_pages, min_pages, mass, scale)


def linear_rows(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` for the rows ``x`` ``(M, K)`` of a decode step, ``weight``
    ``(N, K)``: every output by the same float operations whatever ``M`` and the row's place
    (a sequence decoded in a batch gets what it gets alone), each weight row read once for all
    rows. ``(M, N)``, float32 on the CPU."""
    return torch.ops.atskv.linear_rows(x, weight, bias)


def paged_decode(q: Tensor, knew: Tensor, vnew: Tensor, k: Tensor, v: Tensor, summary: Tensor,
                 index: Tensor, pinned: Tensor, page: int, max_pages: int, fit_pages: int,
                 min_pages: int, mass: float, scale: float) -> Tensor:
    """One layer's decode step over atskv's store (:meth:`StaticPagedKV.decode_ranked`), in
    place: head ``h``'s new ``knew``, ``vnew`` ``(H, d)`` go to row ``index[0, h] + index[1, h]``
    of ``k``, ``v`` and into that page's key min, max and sum (``summary`` ``(N / page, 3, d)``,
    head ``h``'s pages from slot ``index[0, h] / page``), and
    its length ``index[1, h]`` grows by one; then :func:`rank_pages` and :func:`paged_attention`
    over the pages it chose. ``(H, g, d)``."""
    return torch.ops.atskv.paged_decode(q, knew, vnew, k, v, summary, index, pinned, page,
                                        max_pages, fit_pages, min_pages, mass, scale)
