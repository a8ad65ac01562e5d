"""Process-wide CPU settings every ``cf`` command shares: thread count and the allocator.

Threads. ``--threads N`` wins, then ``OMP_NUM_THREADS``, then torch's default (one per core).
On a loaded machine fewer threads are often faster: a model of many small ops waits on its
slowest thread at every op (with another job on a 2-core machine, two threads ran
clusterformer-tiny 5x slower than one).

Allocator. glibc hands every allocation above its mmap threshold (at most 32 MiB) fresh pages
from the kernel and returns them on free, so each large activation (stage 1's MLP hidden layer
is 77 MB at batch 8) is paid again in page faults on every forward. :func:`tune_cpu_allocator`
keeps freed memory in the process for reuse, as PyTorch's CUDA caching allocator does: the
resident size then stays at its peak instead of shrinking between steps. ``cf`` turns it on for
its own process (eager inference at one thread: clusterformer-tiny 17 % and timm Swin-T 9 %
faster, docs/benchmarks.md); ``CF_CPU_ALLOCATOR=system`` keeps glibc's defaults. The library
never changes the allocator on import, and this module imports torch only when called.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_ALLOCATOR_ENV = "CF_CPU_ALLOCATOR"


def configure_threads(threads: int | None = None) -> tuple[int, str]:
    """Set torch's intra-op thread count; returns ``(count, where it came from)``.

    Args:
        threads: an explicit count (``--threads``); ``None`` reads ``OMP_NUM_THREADS``, else
            keeps torch's default.

    Raises:
        ValueError: a count below 1 or an ``OMP_NUM_THREADS`` that is not a positive integer.
    """
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
        return threads, "--threads"
    env = os.environ.get("OMP_NUM_THREADS")
    if env:
        try:
            count = int(env)
        except ValueError:
            count = 0
        if count < 1:
            raise ValueError(f"OMP_NUM_THREADS must be a positive integer, got '{env}'")
        torch.set_num_threads(count)
        return count, "OMP_NUM_THREADS"
    return torch.get_num_threads(), "default: one per core"


def tune_cpu_allocator() -> bool:
    """Keep freed heap memory for reuse (glibc only); returns whether it was changed.

    Sets ``M_MMAP_MAX = 0`` (large blocks come from the heap, which can reuse them) and an
    unlimited trim threshold (freed memory is not returned to the kernel). Skipped when
    ``CF_CPU_ALLOCATOR=system``, on non-glibc systems, or when another allocator (jemalloc,
    tcmalloc) is preloaded.
    """
    if os.environ.get(_ALLOCATOR_ENV, "").lower() == "system":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # -1 is read as an unsigned size: no trimming at all.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))


def runtime_line(device: torch.device | str, threads: tuple[int, str]) -> str:
    """``"cpu, 2 threads (OMP_NUM_THREADS), torch 2.13.0"``: what a command runs on."""
    import torch

    device = torch.device(device)
    where = str(device)
    if device.type == "cuda" and torch.cuda.is_available():
        where = f"{device} ({torch.cuda.get_device_name(device)})"
    count, source = threads
    return f"{where}, {count} thread{'s' if count != 1 else ''} ({source}), torch {torch.__version__}"
