"""Process settings shared by the compute commands: threads, allocator, the start line."""

from __future__ import annotations

from typing import Any

# Set by the root callback from ``cf --threads N``; commands with their own --threads pass it.
THREADS: int | None = None


def start_compute(device: str | None = None, threads: int | None = None,
                  details: list[str] | None = None) -> tuple[int, str]:  # fmt: skip
    """Apply ``--threads`` (else ``OMP_NUM_THREADS``) and the CPU allocator setting, and print
    one line on stdout saying what the command runs on (stderr stays for errors), then one
    ``cf: <detail>`` line per entry of ``details`` (what the command is about to do).

    Returns:
        ``(threads, where the count came from)``.
    """
    from clusterformer.engine.distributed import pick_device
    from clusterformer.engine.runtime import runtime_line
    from clusterformer.runtime import configure

    chosen = threads if threads is not None else THREADS
    settings = configure(chosen)  # what a library user gets from clusterformer.runtime too
    count = (settings.threads, "--threads" if chosen is not None else settings.threads_from)
    print(f"cf: {runtime_line(pick_device(device), count)}", flush=True)
    for line in details or []:
        print(f"cf: {line}", flush=True)
    return count


def augmentation_part(cfg: Any) -> str:
    """``cf train``'s start-line part naming the augmentation and eval preprocessing the run
    uses (chosen from the data: :func:`clusterformer.engine.augment_plan.plan_augmentation`)."""
    from clusterformer.engine.augment_plan import plan_augmentation

    try:
        return plan_augmentation(cfg).describe()
    except (ValueError, OSError):  # unreadable data: training reports it by name
        return ""
