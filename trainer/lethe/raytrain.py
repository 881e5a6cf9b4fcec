"""Ray Train's ``TorchTrainer`` as Lethe runs it: with a placement-group cleaner that
goes away when its work is done.

Ray Train v2 starts a detached ``PlacementGroupCleaner`` actor beside every run's
controller; when the controller dies (its driver was SIGKILLed, or the warm retrain
service holding it died), the cleaner removes the run's placement group and then calls
``ray.actor.exit_actor()`` from its monitoring thread, where that cannot end an actor:
it stays alive, about 240 MB, for good. And its monitoring thread dies on the first
error of Ray's state API other than one kind (for instance when it cannot tell which of
two local Ray instances is its own), leaving the placement group held. Ours retries,
and ends itself with ``ray.kill`` when it is not on the actor's main thread. Imported
only where Ray Train runs (it imports Ray).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any

import ray
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks import placement_group_callback
from ray.train.v2._internal.callbacks.placement_group_callback import (
    PlacementGroupCleanerCallback,
)
from ray.train.v2._internal.execution.controller.placement_group_cleaner import (
    PlacementGroupCleaner,
)
from ray.train.v2._internal.state.util import is_actor_alive


class ExitingPlacementGroupCleaner(PlacementGroupCleaner):
    def _monitor_loop(self) -> None:
        """Ray's loop, except that any error asking whether the controller lives (Ray's
        loop dies on all but one kind, leaving the placement group held) is retried."""
        group = None
        while not self._stop_event.is_set():
            with contextlib.suppress(queue.Empty):
                group = self._pg_queue.get(timeout=self._check_interval_s)
            try:
                alive = is_actor_alive(self._controller_actor_id, self._get_actor_timeout_s)
            except Exception:  # noqa: BLE001 - the state API may be briefly unavailable
                continue
            if not alive:
                while not self._pg_queue.empty():
                    group = self._pg_queue.get_nowait()
                self._cleanup_placement_group(group)
                break
        self._exit()
        self._monitor_thread = None

    def _exit(self) -> None:
        if self._exiting:
            return
        if threading.current_thread() is threading.main_thread():
            super()._exit()
            return
        self._exiting = True
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


class ExitingCleanerCallback(PlacementGroupCleanerCallback):
    def after_controller_start(self, train_run_context: Any) -> None:
        # This runs in the run's controller actor, a process of its own: have it start
        # our cleaner instead of Ray's.
        placement_group_callback.PlacementGroupCleaner = ExitingPlacementGroupCleaner  # type: ignore[misc]
        super().after_controller_start(train_run_context)


class LetheTorchTrainer(TorchTrainer):
    def _create_default_callbacks(self) -> list[Any]:
        return [
            ExitingCleanerCallback() if isinstance(c, PlacementGroupCleanerCallback) else c
            for c in super()._create_default_callbacks()
        ]
