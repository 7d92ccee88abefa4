"""The Hydra plugin class of ``hydra/launcher=ray_cluster`` (Hydra finds launchers only under
``hydra_plugins``); the work is done in :mod:`tiled_hydra.cli.ray_launcher`. Hydra imports this
module on every start, so Ray is imported only when jobs are launched."""

from __future__ import annotations

from typing import Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher


class RayClusterLauncher(Launcher):
    def __init__(self, address: str | None = "auto", log_to_driver: bool = False, init=None, remote=None) -> None:
        from tiled_hydra.cli.ray_launcher import launcher_config

        self.address, self.log_to_driver, self.init, self.remote = launcher_config(address, log_to_driver, init, remote)
        self.config = self.hydra_context = self.task_function = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from tiled_hydra.cli.ray_launcher import launch

        return launch(self, job_overrides, initial_job_idx)
