"""The event log's writer for workers on other nodes than the driver's, which need not see the driver's job folder.

The pipeline starts one relay actor per run on the driver's node (`start_relay`) and hands it to the stages on the
driver's `EventLog` (its ``relay``); a stage passes it on in its workers' tasks. `worker_events` gives a worker (an
ensemble member, a distillation rank) an `EventLog` that appends the local file when the worker shares the driver's
node (or there is no relay: a stage or loop run on its own) and otherwise sends each line to the relay, which appends
it there. Sends wait for the relay's answer, so a worker's events are in the log, in order, before its task returns
and the driver logs the stage's end.
"""

from __future__ import annotations

import os
from typing import Any

from ray_jobs.events import EventLog


class _Relay:
    """Appends lines to the driver's event log on the driver's node."""

    def __init__(self, job_dir: str):
        import ray

        self.log = EventLog(job_dir)
        self.node = ray.get_runtime_context().get_node_id()

    def node_id(self) -> str:
        return self.node

    def append(self, line: str) -> None:
        self.log.append(line)

    def since_started(self, stage: str) -> list[dict[str, Any]]:
        return self.log.since_started(stage)


class RelayedEventLog(EventLog):
    """An `EventLog` whose reads and writes are the relay's: the file it names lies on the driver's node."""

    def __init__(self, job_dir: str | os.PathLike[str], relay: Any):
        super().__init__(job_dir)
        self.relay = relay

    def append(self, line: str) -> None:
        import ray

        ray.get(self.relay.append.remote(line))

    def since_started(self, stage: str) -> list[dict[str, Any]]:
        import ray

        return ray.get(self.relay.since_started.remote(stage))


def start_relay(job_dir: str | os.PathLike[str]) -> Any:
    """Start a relay for the job's event log on this (the driver's) node; it lives as long as the returned handle."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return (
        ray.remote(_Relay)
        .options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False))
        .remote(os.fspath(job_dir))
    )


def worker_events(job_dir: str | os.PathLike[str], relay: Any = None) -> EventLog:
    """The event log as a worker writes it: through `relay` when the worker runs on another node than the relay
    (the driver's), else the file itself."""
    if relay is not None:
        import ray

        from ray_jobs.handover import this_node

        if ray.get(relay.node_id.remote()) != this_node():
            return RelayedEventLog(job_dir, relay)
    return EventLog(job_dir)
