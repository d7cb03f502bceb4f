"""`refusal-nnsight`: the Hydra app. The only module that imports hydra.

compose conf/ → typed RunConfig (config.from_dict, validation.validate) → pipeline.run. User mistakes
end with one line on stderr and exit code 2. A single run's config and run folder are checked
before Hydra writes anything (unknown keys, secrets, every range, a run folder holding another
config's results or in use by another run). `--force-restart` is `force_restart=true`. `-m` runs a sweep: one run folder per job (Hydra's sweep
<dir>/<job number>), any launcher (`hydra/launcher=ray`: hydra_plugins/refusal_nnsight_ray), and
SweepSummaryCallback tabulates the jobs when the sweep ends.
"""

from __future__ import annotations

import logging
import re
import shutil
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from .errors import UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "sae", "data", "data/harmful", "data/harmless", "search", "judge", "backend", "experiment")

log = logging.getLogger("refusal_nnsight")


# Override keys that look like credentials: secrets come from the environment (NDIF_API_KEY,
# HF_TOKEN) or nnsight's own config, and must never reach .hydra/*.yaml, logs or run files.
_SECRET_KEY = re.compile(r"(^|[._])(token|api_?key|secret|password|credentials?)$", re.IGNORECASE)


def _register_resolvers() -> None:
    """`${rn_default:VALUE,DEFAULT}`: DEFAULT when VALUE is null (oc.select only covers missing keys)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("rn_default"):
        OmegaConf.register_new_resolver(
            "rn_default", lambda value, default: default if value in (None, "") else value
        )


def _check_no_secret_overrides(argv: list[str]) -> None:
    for arg in argv:
        key, sep, _ = arg.lstrip("+~").partition("=")
        if sep and _SECRET_KEY.search(key):
            raise UserError(
                f"'{key}' looks like a credential; pass secrets through the environment "
                "(NDIF_API_KEY, HF_TOKEN), never as a config value"
            )


_URL_CREDENTIALS = re.compile(r"://[^/\s@]*:[^/\s@]*@")


def _check_no_url_credentials(argv: list[str]) -> None:
    """`backend.host=https://user:SECRET@host` would land in .hydra/ and config.json: refused."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if sep and _URL_CREDENTIALS.search(value):
            raise UserError(
                f"the value of '{key}' holds credentials (user:password@ in a URL); give the URL alone "
                "and pass secrets through the environment (NDIF_API_KEY, HF_TOKEN)"
            )


def _check_known_keys(argv: list[str]) -> None:
    """An override of a key no config dataclass has is refused before Hydra writes or echoes it
    (a mistyped key may hold a secret: `-m backend.key=...` would reach multirun.yaml)."""
    from .validation import leaf_fields

    known, mappings = set(), []
    for name, tp in leaf_fields():
        parts = name.split(".")
        known |= {".".join(parts[: i + 1]) for i in range(len(parts))}
        if "dict" in str(tp):  # a mapping field takes sub-keys (search.candidates.layers.start=0)
            mappings.append(name + ".")
    for arg in argv:
        key, sep, _ = arg.lstrip("+~").partition("=")
        if not sep or key.startswith("hydra") or "/" in key or key in GROUPS or key in known:
            continue
        if key.startswith(tuple(mappings)):
            continue
        parent = key.rpartition(".")[0]
        valid = sorted(k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent)
        raise UserError(
            f"unknown config key '{key}'; valid keys{f' under {parent}' if parent else ''}: {valid}"
        )


def _check_run_dir_given(argv: list[str]) -> None:
    for arg in argv:
        key, sep, value = arg.lstrip("+").partition("=")
        if key == "run_dir" and sep and not value.strip().strip("'\""):
            raise UserError(
                "run_dir is empty; give a folder (run_dir=runs/mine) or leave it out for a fresh one"
            )


def _check_group_choices(argv: list[str]) -> None:
    """Unknown `group=name` choices fail here with one line, before Hydra prints a traceback."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if sep and key in GROUPS and value not in ("null", ""):
            for name in value.split(","):  # sweeps: model=a,b
                if not (CONF_DIR / key / f"{name}.yaml").exists():
                    options = sorted(p.stem for p in (CONF_DIR / key).glob("*.yaml"))
                    raise UserError(f"unknown {key} '{name}'; choose one of {options}")


def _check_run_dir_not_swept(argv: list[str]) -> None:
    """run_dir names one folder: a run's, or in a multirun the sweep's (jobs in run_dir/<job number>)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    for arg in argv:
        if arg.lstrip("+").partition("=")[0] == "run_dir":
            try:
                (override,) = OverridesParser.create().parse_overrides([arg])
            except OverrideParseException:
                continue  # Hydra reports the syntax error itself
            if override.is_sweep_override():
                raise UserError(
                    "run_dir cannot be swept: it names one folder (in a multirun the sweep folder, "
                    "with a subfolder per job); sweep other keys, e.g. -m run_dir=runs/mine seed=0,1"
                )


def override_keys(overrides) -> set[str]:
    """The dotted config keys a list of overrides sets (`++data.harmful.path=x` → data.harmful.path)."""
    return {str(o).lstrip("+~").partition("=")[0] for o in overrides if "=" in str(o)}


def to_run_config(dcfg, explicit=None):
    """Hydra's DictConfig → the typed, validated RunConfig (mistakes are UserErrors). `explicit`:
    the keys set on the command line (validation.validate refuses those that do not apply)."""
    from omegaconf import OmegaConf

    from .config import RunConfig, from_dict
    from .validation import validate

    raw = OmegaConf.to_container(dcfg, resolve=False)
    assert isinstance(raw, dict)  # a config's root is a mapping
    raw.pop("hydra", None)
    raw.pop("experiment", None)
    data = OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
    assert isinstance(data, dict)
    return validate(from_dict(RunConfig, data), explicit)


def compose(overrides: list[str] | None = None):
    """Compose conf/ with overrides, as the CLI does, without running anything (tests, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides = list(overrides or [])
    _check_overrides(overrides)
    _register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        dcfg = hydra_compose(config_name="config", overrides=expand_overrides(overrides))
        return to_run_config(dcfg, override_keys(overrides))


def _check_overrides(argv: list[str]) -> None:
    """Every check that needs only the command line (nothing composed yet)."""
    _check_no_secret_overrides(argv)
    _check_no_url_credentials(argv)
    _check_known_keys(argv)
    _check_group_choices(argv)
    _check_run_dir_given(argv)


def expand_overrides(argv: list[str]) -> list[str]:
    """Let every dataclass field be overridden, even where a YAML file leaves it at its default:
    `a.b=v` becomes Hydra's add-or-override `++a.b=v`. Unknown keys are still refused, with one
    line, when the composed config is checked against the dataclasses."""
    out = []
    for arg in argv:
        key, sep, _ = arg.partition("=")
        plain = sep and "." in key and not key.startswith(("+", "~", "hydra.", "-"))
        out.append(f"++{arg}" if plain else arg)
    return out


def _task(dcfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from . import pipeline
    from .artifacts import RunFolder
    from .errors import RunDirBusy

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    fresh = not (run_dir / "config.json").exists()  # config.json is written once inputs are valid
    try:
        cfg = to_run_config(dcfg, override_keys(hydra_cfg.overrides.task))
        cfg.run_dir = str(run_dir)
        with RunFolder(run_dir).lock():  # held through the cleanup: no other run's file is removed
            try:
                pipeline.run(cfg)
            except UserError as err:
                _stop(err, run_dir if fresh else None)
    except UserError as err:  # a bad config, or the folder is in use by another run
        _stop(err, run_dir if fresh and not isinstance(err, RunDirBusy) else None)


def _stop(err: UserError, clean: Path | None) -> None:
    """One `error:` line on stderr (and in the run's log); a fresh folder keeps only its log."""
    _log_to_file(f"error: {err}")  # the console gets it once, on stderr
    print(f"error: {err}", file=sys.stderr)
    if clean is not None and not (clean / "config.json").exists():
        _keep_only_log(clean)
    sys.exit(err.exit_code)


def _log_to_file(message: str) -> None:
    """Write an error line to the run's log file only (Hydra's console handler would repeat it)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (message,), None)
    for handler in logging.getLogger().handlers + log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _precheck(argv: list[str]) -> None:
    """A single run: compose, validate and check its run folder before Hydra creates or writes
    anything in it (.hydra/ of a run in progress, or of another config's results, stays intact)."""
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    from . import pipeline
    from .artifacts import RunFolder

    try:
        cfg = compose(argv)
    except OverrideParseException as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(
            f"an override is not valid Hydra syntax ({first}); quote values with special characters: key='value'"
        ) from None
    except (HydraException, OmegaConfBaseException):
        return  # Hydra reports its own errors when it composes again
    if cfg.run_dir and Path(cfg.run_dir).is_dir():
        folder = RunFolder(cfg.run_dir)
        folder.check_free()
        pipeline.claim_check(folder, cfg)


class SweepSummaryCallback(Callback):
    """conf/config.yaml `hydra.callbacks`: when a multirun ends, on whichever launcher, tabulate its
    jobs (sweep_summary.parquet / .md in the sweep folder; refusal_nnsight.sweep)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        from . import sweep
        from .artifacts import SweepFolder

        folder = SweepFolder(str(config.hydra.sweep.dir))
        try:
            _, text = sweep.summarize(folder.root)
        except UserError as err:  # e.g. every job stopped before writing summary.json
            log.warning("no sweep summary: %s", err)
            return
        log.info("sweep summary: %s\n%s", folder.markdown, text)


def _keep_only_log(run_dir: Path) -> None:
    """A run that failed on bad input leaves nothing but its log (Hydra wrote .hydra/ already)."""
    for path in run_dir.iterdir():
        if path.suffix == ".log" or path.name == ".lock":
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def main() -> None:
    import hydra

    argv = ["force_restart=true" if a == "--force-restart" else a for a in sys.argv[1:]]
    multirun = any(a in ("-m", "--multirun") for a in argv)
    try:
        _check_overrides(argv)
        _check_run_dir_not_swept(argv)
        if not multirun and not any(a.startswith("-") for a in argv):  # not --help, --cfg, ...
            _precheck(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    sys.argv[1:] = expand_overrides(argv)
    _register_resolvers()
    app = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_task)
    app()


if __name__ == "__main__":
    main()
