"""Outputs a worker writes for the driver, when the two may not share a filesystem.

An ensemble member and the distillation's rank 0 write their folders (a reward model, the policy) into the driver's
staging folder. On the driver's node, or on a cluster whose nodes all mount the job folders, that is the end of it.
On another node with an artifact root set, the worker writes the folder locally and `hand_over` uploads it to the
root under the same relative path with a completion marker; the driver's `take_over` downloads it into its staging
folder and deletes the root's copy. A worker elsewhere without an artifact root can only assume a shared folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from ray_jobs.artifact_store import ArtifactStore
from ray_jobs.layout import JobLayout


def this_node() -> str | None:
    """This process's Ray node id; None outside Ray (a loop run as a plain function)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def hand_over(layout: JobLayout, folder: str | os.PathLike[str], driver_node: str | None) -> bool:
    """Upload `folder` for a driver on `driver_node` when this is another node and an artifact root is set; returns
    whether it went up."""
    store = ArtifactStore.from_env()
    if store is None or driver_node is None or this_node() == driver_node:
        return False
    store.publish_folder(layout, Path(folder))
    return True


def take_over(layout: JobLayout, folder: str | os.PathLike[str]) -> None:
    """Bring a folder a worker handed over into place, when this node's copy is missing or empty."""
    folder = Path(folder)
    store = ArtifactStore.from_env()
    if store is None or (folder.is_dir() and any(folder.iterdir())):
        return
    if store.fetch_folder(layout, folder):
        store.discard_folder(layout, folder)
