"""`hydra/launcher=ray`: its config (registered in Hydra's ConfigStore) and the Launcher.

The keys follow hydra-ray-launcher's (`ray.init.*` for `ray.init`, `ray.remote.*` for
`ray.remote`), so its command lines work here. Nothing in this module imports Ray: Hydra imports
every plugin module at start-up, and Ray is needed only once a sweep is launched (`_core`).

No `from __future__ import annotations` here: Hydra's plugin scanner runs this module before it
is in sys.modules, where dataclasses cannot resolve string annotations.
"""

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class RayConf:
    # ray.init(**init). address: null starts a local cluster for the sweep, with num_cpus CPUs
    # (null: all of them); "auto" (the cluster of `ray start` on this machine), "HOST:6379" or
    # "ray://HOST:10001" joins a running one (leave num_cpus null then). Other ray.init
    # arguments with a leading +: +hydra.launcher.ray.init.KEY=VALUE.
    init: dict[str, Any] = field(default_factory=lambda: {"address": None, "num_cpus": None})
    # ray.remote(**remote) for every job: what one job reserves (num_cpus, +num_gpus, +memory, …).
    remote: dict[str, Any] = field(default_factory=lambda: {"num_cpus": 1})


@dataclass
class RayLauncherConf:
    _target_: str = "hydra_plugins.refusal_nnsight_ray.ray_launcher.RayLauncher"
    ray: RayConf = field(default_factory=RayConf)


ConfigStore.instance().store(
    group="hydra/launcher", name="ray", node=RayLauncherConf, provider="refusal_nnsight"
)


class RayLauncher(Launcher):
    """Each job of a multirun as one Ray task; every job gets the sweep's <dir>/<subdir> folder."""

    def __init__(self, ray: DictConfig) -> None:
        self.ray_cfg = ray
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        try:
            from . import _core
        except ModuleNotFoundError as err:
            if err.name != "ray":
                raise
            print("error: hydra/launcher=ray needs Ray: pip install 'ray>=2.10,<3'", file=sys.stderr)
            sys.exit(2)
        return _core.launch(self, job_overrides, initial_job_idx)
