"""The store a worker group builds its process group on: a fresh one for every group.

Why. torchrun's elastic agent (``--max-restarts``, ``--nnodes MIN:MAX``) starts a new worker
group after a worker dies or a node comes or goes. Since torch 2.4 the agents keep one
TCPStore for all rounds (``TORCHELASTIC_USE_AGENT_STORE=True``) and the ``env://``
rendezvous hands it to the workers as it is, so the keys the dead group wrote (each rank's
gloo address) are still there: a restarted rank that reads them before its peer has
rewritten them connects to a port nobody listens on any more ("Connection refused",
"timed out connecting" in gloo's full-mesh connect) -- a race that ``cf train``'s slower start
(imports, the dataset index) lost where a minimal script won it. A prefix naming the restart
does not help: ``TORCHELASTIC_RESTART_COUNT`` is each agent's own count, and an agent whose
workers are restarted because another node failed does not count it.

How. Rank 0 (on the node that hosts the agents' store, ``MASTER_ADDR``) opens a new TCPStore
on a free port and publishes ``PORT NONCE`` in the agents' store; every other rank reads that,
connects, and checks the nonce inside, retrying while it finds a dead group's entry (refused,
or another nonce). The process group then starts on a store with no keys but its own.
Nothing is bound to a fixed port. Outside an agent that shares its store (plain ``env://``),
rank 0 hosts the store anyway and it dies with its group: that is used as it is.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import timedelta

import torch.distributed as dist

_ENTRY = "clusterformer/group-store"
_NONCE = "clusterformer/nonce"
_PROBE = timedelta(seconds=2)  # one connection try to a published port


def agent_store(timeout: timedelta) -> dist.Store | None:
    """A client of the elastic agents' store, which outlives worker groups (None when the
    agent does not share one)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                         is_master=False, timeout=timeout)  # fmt: skip


def group_store(agent: dist.Store | None, rank: int, world_size: int,
                timeout: timedelta) -> dist.Store:  # fmt: skip
    """The store for this worker group's process group (see the module docstring)."""
    if agent is None:
        store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size,
                                           timeout=timeout))  # fmt: skip
        return store
    if rank == 0:
        server = dist.TCPStore(os.environ["MASTER_ADDR"], 0, world_size, is_master=True,
                               timeout=timeout, wait_for_workers=False)  # fmt: skip
        nonce = uuid.uuid4().hex
        server.set(_NONCE, nonce)
        agent.set(_ENTRY, f"{server.port} {nonce}")
        return server
    return _join(agent, timeout)


def _join(agent: dist.Store, timeout: timedelta) -> dist.Store:
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        port, nonce = agent.get(_ENTRY).decode().split()  # waits until some group published
        try:
            client = dist.TCPStore(os.environ["MASTER_ADDR"], int(port), is_master=False,
                                   timeout=_PROBE)  # fmt: skip
            if client.get(_NONCE).decode() == nonce:
                client.set_timeout(timeout)
                return client
        except (RuntimeError, ValueError):  # a dead group's port: refused, or reused
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank 0 published no live process-group store in "
                               f"{timeout.total_seconds():.0f} s")  # fmt: skip
        time.sleep(0.2)
