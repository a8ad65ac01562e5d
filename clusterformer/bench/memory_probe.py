"""The child process of ``cf benchmark``'s CPU memory column: one model, one call, its peak.

Run as ``python -m clusterformer.bench.memory_probe REQUEST_JSON`` by
:func:`clusterformer.bench.runner.measure`; prints one JSON line. A process of its own because
torch keeps no CPU allocation statistics, so the peak resident size of a process that ran only
this model is the only figure that belongs to it.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

from clusterformer.bench.models import NUM_CLASSES, parse_model
from clusterformer.bench.runner import BenchConfig, Runner


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def probe(request: dict[str, Any]) -> dict[str, float]:
    """Build the model, run one warm-up call, reset the high-water mark, run one measured
    call; peak resident memory and its rise during that call (MiB)."""
    from clusterformer.engine.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # the setting cf itself runs with
    cfg = BenchConfig(batch_size=request["batch_size"], image_size=request["image_size"],
                      amp=request["amp"], seed=request["seed"])
    generator = torch.Generator().manual_seed(cfg.seed)
    images = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=generator)
    targets = torch.randint(0, NUM_CLASSES, (cfg.batch_size,), generator=generator)
    runner = Runner(parse_model(request["model"]), request["mode"], False, cfg,
                    torch.device("cpu"), images, targets)
    runner.call()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident size (VmHWM) to the current one
    before = _status_kib("VmRSS")
    runner.call()
    peak = _status_kib("VmHWM")
    return {"peak_rss_mib": peak / 1024, "call_rise_mib": (peak - before) / 1024}


if __name__ == "__main__":
    print(json.dumps(probe(json.loads(sys.argv[1]))))
