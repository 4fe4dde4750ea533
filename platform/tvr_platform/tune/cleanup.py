"""Free the worker placement group of a trial that Tune killed (ASHA stop, error).

Ray Train V2 creates the worker placement group from its controller actor; placement groups live
as long as the job (the ``tvr tune`` driver), not the actor. When Tune stops a trial early it kills
the trial actor, the controller dies with it and Train's detached ``PlacementGroupCleaner`` is
meant to remove the group -- but it polls the controller through the State API, which needs the
dashboard, and tvr starts Ray without one. The group then keeps its CPUs for the rest of the
campaign and every later trial's workers wait for them until ``WorkerGroupStartupTimeoutError``
(retried for ever). So each trial records its group on its MLflow run, and the campaign driver
removes it when Tune reports the trial ended. Needs Ray: imported only inside trials / the driver.
"""

from __future__ import annotations

import ray
from ray.train.v2._internal.execution.callback import WorkerGroupCallback

PLACEMENT_GROUP_TAG = "tvr.train.placement_group"


class RecordPlacementGroup(WorkerGroupCallback):
    """Ray Train callback (runs in the controller): tag the trial's MLflow run with the id of
    each worker placement group it starts."""

    def __init__(self, tracker):
        self.tracker = tracker

    def after_worker_group_start(self, worker_group) -> None:
        pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
        self.tracker.set_tags({PLACEMENT_GROUP_TAG: pg.id.hex()})


def remove_placement_group(pg_hex: str) -> bool:
    """Remove the placement group ``pg_hex`` unless already removed; True if it was removed now."""
    from ray.util.placement_group import PlacementGroup, placement_group_table

    pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_hex)))
    state = placement_group_table(pg).get("state")
    if state in (None, "REMOVED"):
        return False
    ray.util.remove_placement_group(pg)
    return True
