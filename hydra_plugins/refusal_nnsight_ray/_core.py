"""The Ray side of `hydra/launcher=ray`, after hydra's BasicLauncher and hydra-ray-launcher's
`_core.launch`: compose each job's config on the driver, run it with Hydra's own `run_job` in a
Ray task, and hand the JobReturns back to the sweeper.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher  # a RayLauncher (ray_launcher imports this module)
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


def launch(
    launcher: Launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
) -> list[JobReturn]:
    """Start (or join) Ray, submit one task per job, wait for all of them."""
    setup_globals()
    config, context = launcher.config, launcher.hydra_context
    assert config is not None and context is not None and launcher.task_function is not None
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    # Made absolute on the driver: a worker may start in another directory (or on another
    # machine) and would resolve a relative sweep dir against it.
    sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    _start_ray(launcher.ray_cfg.init)
    options = OmegaConf.to_container(launcher.ray_cfg.remote, resolve=True) or {}
    # A job's progress bars reach the driver as lines of carriage returns, one blank-looking
    # "(_run_job pid=…)" line per update; each job's log file keeps its record, so bars are off.
    env = options.setdefault("runtime_env", {}).setdefault("env_vars", {})
    env.setdefault("TQDM_DISABLE", "1")
    task = ray.remote(**options)(_run_job)
    log.info("Launching %d jobs on Ray, sweep output dir: %s", len(job_overrides), sweep_dir)
    state = Singleton.get_state()  # ConfigStore, resolvers (rn_default), JobRuntime for the workers
    pending = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        job_config = context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(job_config):
            job_config.hydra.job.id = idx
            job_config.hydra.job.num = idx
            job_config.hydra.sweep.dir = str(sweep_dir)
        pending.append(task.remote(context, job_config, launcher.task_function, state))
    results = ray.get(pending)
    exits = [r for r in results if not isinstance(r, JobReturn)]
    if exits:  # a job ended itself (the app's sys.exit(2) on bad input): so does the sweep
        sys.exit(next((code for code in exits if code), 0))
    return results


def _start_ray(init: DictConfig) -> None:
    if ray.is_initialized():
        log.info("Ray is already running; using it")
        return
    kwargs = OmegaConf.to_container(init, resolve=True)
    # address null means a cluster of this sweep's own: Ray's own default (None) would join the
    # last `ray start` cluster of this machine, or RAY_ADDRESS's, when there is one.
    kwargs["address"] = kwargs.get("address") or "local"
    log.info("ray.init(%s)", ", ".join(f"{k}={v!r}" for k, v in kwargs.items()))
    try:
        ray.init(**kwargs)
    except ConnectionError as err:  # address=auto or HOST:PORT with no cluster there
        first = str(err).strip().split(". ")[0] or type(err).__name__
        print(
            f"error: no Ray cluster at hydra.launcher.ray.init.address={kwargs['address']} ({first}); "
            "start one with `ray start --head`, or leave the address null for a local cluster of this sweep",
            file=sys.stderr,
        )
        sys.exit(2)


def _run_job(
    hydra_context: HydraContext, config: DictConfig, task_function: TaskFunction, singleton_state: Any
) -> JobReturn | int | str | None:
    """One job, in a Ray worker: Hydra's run_job writes <sweep dir>/<subdir>/.hydra/ and the job's
    log, then calls the app. A SystemExit must not end the worker; its code goes to the driver."""
    setup_globals()
    Singleton.set_state(singleton_state)
    HydraConfig.instance().set_config(config)
    try:
        return run_job(
            hydra_context=hydra_context,
            task_function=task_function,
            config=config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
    except SystemExit as exit_:
        return exit_.code
