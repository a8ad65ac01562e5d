"""The process settings ``cf`` runs with, for a script that uses ClusterFormer as a library.

``cf`` sets two things for its own process before any compute: the intra-op thread count and
the CPU allocator (``clusterformer.engine.runtime`` says why each matters). Importing
``clusterformer`` changes neither: a library must not reach into its host process. A script of
your own that calls :func:`clusterformer.models.create_model`, ``timm.create_model`` or
:func:`clusterformer.load` gets the same speed as ``cf`` by calling :func:`configure` once, at
its start::

    import clusterformer.runtime
    print(clusterformer.runtime.configure(threads=1))  # cpu, 1 thread (threads=1), torch ...

The rest of what makes ``cf train`` fast needs no process setting: the fused linear and its
backward are the models' own (``clusterformer.ops.linear``), and the optimizer is torch's fused
AdamW (``clusterformer.engine.optim.build_optimizer``; with an optimizer of your own, pass
``fused=True`` to ``torch.optim.AdamW``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RuntimeSettings", "configure"]


@dataclass(frozen=True)
class RuntimeSettings:
    """What :func:`configure` set: the thread count and where it came from, and whether the
    allocator now keeps freed memory for reuse (``False``: left as it was, and why)."""

    threads: int
    threads_from: str
    allocator: str

    def __str__(self) -> str:
        plural = "s" if self.threads != 1 else ""
        return f"cpu, {self.threads} thread{plural} ({self.threads_from}), allocator: {self.allocator}"


def configure(threads: int | None = None, *, allocator: bool = True) -> RuntimeSettings:
    """Give this process the CPU settings ``cf`` runs with.

    Args:
        threads: intra-op threads; ``None`` reads ``OMP_NUM_THREADS``, else keeps torch's
            default (one per core). On a loaded machine fewer threads are often faster.
        allocator: keep freed heap memory for reuse instead of returning every large
            activation to the kernel (glibc only; ``CF_CPU_ALLOCATOR=system`` in the
            environment also turns it off). The process's resident size then stays at its
            peak.

    Returns:
        The settings, printable as one line.

    Raises:
        ValueError: ``threads`` below 1, or an ``OMP_NUM_THREADS`` that is no positive integer.
    """
    from clusterformer.engine.runtime import configure_threads, tune_cpu_allocator

    count, source = configure_threads(threads)
    if threads is not None:
        source = f"threads={threads}"
    if not allocator:
        kept = "unchanged (allocator=False)"
    elif tune_cpu_allocator():
        kept = "keeps freed memory"
    else:
        kept = "unchanged (not glibc, another allocator preloaded, or CF_CPU_ALLOCATOR=system)"
    return RuntimeSettings(count, source, kept)
