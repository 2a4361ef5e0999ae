"""Checks before a job starts: a valid config and a run directory it may write to.

Run by the run-tracking callback before Hydra creates the run directory, so that a bad value or a taken
run id stops the command with a message naming the key, and nothing is recorded or overwritten.
Imports only OmegaConf (and Hydra's override parser): the CLI's start-up must stay fast.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from latentdyn.tracking.ranks import spawns_inside_the_fit

# One path component; letters, digits, `_`, `-` and `.`; not starting with `.` (rules out `.`, `..` and
# hidden directories) and not empty.
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")

# Keys whose value may be an int or a float whatever the shipped default's type (Lightning reads an int as
# "every N batches" and a float as "a fraction of the epoch").
NUMBER_KEYS = frozenset(
    {"trainer.val_check_interval", "trainer.limit_val_batches", "trainer.limit_train_batches"}
)


class ConfigError(ValueError):
    """A config value a job must not start with, or a run id already taken; the message names the key."""


class InvalidValue(ConfigError):
    """A config value of the wrong type or outside its range."""

    def __str__(self) -> str:
        return f"invalid config: {super().__str__()}"


def check_run_id(run_id: Any, key: str = "run_id") -> str:
    """``run_id`` (or another run-directory component, ``key``: ``name``, ``tier``) as the one safe path
    component it must be, or :class:`ConfigError`."""
    text = str(run_id)
    if not RUN_ID_PATTERN.fullmatch(text):
        raise InvalidValue(
            f"{key}={text!r} is not valid: it names one directory under outputs/, so it must be "
            "1-128 characters of letters, digits, `_`, `-` and `.`, not starting with `.` (no `/`)"
        )
    return text


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list | ListConfig):
        return "list"
    if isinstance(value, dict | DictConfig):
        return "dict"
    return "none" if value is None else type(value).__name__


_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false", "list": "a list"}


def _compatible(default: Any, value: Any, number_ok: bool) -> bool:
    """Whether ``value`` may replace ``default``: same kind, an int for a float, any scalar for a string."""
    want, got = _kind(default), _kind(value)
    if want in ("none", "dict") or value is None:
        return True
    if number_ok and want in ("int", "float"):
        return got in ("int", "float")
    if want == "float":
        return got in ("int", "float")
    if want == "str":
        return got in ("str", "int", "float", "bool")
    return want == got


def check_types(cfg: DictConfig, baseline: DictConfig, keys: Iterable[str]) -> None:
    """Every key in ``keys`` has a value of the kind the shipped config (``baseline``) has there.

    List elements are checked against the default list's first element.
    """
    for key in keys:
        default = OmegaConf.select(baseline, key, default=None, throw_on_missing=False)
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if isinstance(default, DictConfig) or isinstance(value, DictConfig):
            continue
        number_ok = key in NUMBER_KEYS
        if not _compatible(default, value, number_ok):
            raise InvalidValue(
                f"{key}={_show(value)}: expected {_EXPECTED.get(_kind(default), _kind(default))} "
                f"(the default is {_show(default)})"
            )
        if isinstance(default, ListConfig) and len(default) > 0 and isinstance(value, ListConfig):
            for i, item in enumerate(value):
                if not _compatible(default[0], item, number_ok):
                    raise InvalidValue(
                        f"{key}[{i}]={_show(item)}: expected {_EXPECTED.get(_kind(default[0]), 'a value')} "
                        f"like the default's {_show(default[0])}"
                    )


def _show(value: Any) -> str:
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=False)
    return repr(value) if isinstance(value, str) else str(value).replace("'", "")


def _positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidValue(f"{key}={_show(value)}: expected a positive integer")


def _non_negative_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidValue(f"{key}={_show(value)}: expected an integer >= 0")


def _positive_ints(key: str, value: Any) -> None:
    if not isinstance(value, ListConfig | list) or len(value) == 0:
        raise InvalidValue(f"{key}={_show(value)}: expected a non-empty list of positive integers")
    for i, item in enumerate(value):
        _positive_int(f"{key}[{i}]", item)


def _one_of(*choices: str) -> Callable[[str, Any], None]:
    def check(key: str, value: Any) -> None:
        if value not in choices:
            raise InvalidValue(f"{key}={_show(value)}: expected one of {', '.join(choices)}")

    return check


def _boolean(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise InvalidValue(f"{key}={_show(value)}: expected true or false")


def _integer(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValue(f"{key}={_show(value)}: expected an integer")


def _unit_interval_pair(key: str, value: Any) -> None:
    ok = isinstance(value, ListConfig | list) and len(value) == 2
    ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    if not ok or not 0.0 <= value[0] < value[1] <= 1.0:
        raise InvalidValue(f"{key}={_show(value)}: expected [lo, hi] with 0 <= lo < hi <= 1")


# Value rules applied wherever the key exists (whatever the experiment); types alone are checked for
# every overridden key by :func:`check_types`.
RULES: Mapping[str, Callable[[str, Any], None]] = {
    "seed": _integer,
    "resume": _boolean,
    "overwrite": _boolean,
    "force": _boolean,
    "pretrained": _boolean,
    "standardize": _boolean,
    "restore_best": _boolean,
    "horizon_mode": _one_of("lag", "stride"),
    "predict": _one_of("median", "mean", "sample"),
    "horizons": _positive_ints,
    "rollout_lengths": _positive_ints,
    "horizon_k": _positive_int,
    "trainer.max_steps": _positive_int,
    "checkpointing.every_n_steps": _positive_int,
    "datamodule.batch_size": _positive_int,
    "datamodule.num_workers": _non_negative_int,
    "datamodule.max_val_windows": _positive_int,
    "datamodule.slice": _one_of("all", "high_energy", "utterance_medial"),
    "datamodule.medial_range": _unit_interval_pair,
    "model.context": _positive_int,
    "max_steps": _positive_int,
    "phase1_max_steps": _positive_int,
    "latent_dim": _positive_int,
    "init": _one_of("pretrained", "scratch"),
}


def check_variant(cfg: DictConfig) -> None:
    """``variant``, when set, names one of the experiment's ``variants``."""
    variants, choice = cfg.get("variants"), cfg.get("variant")
    if isinstance(variants, DictConfig) and choice is not None and str(choice) not in variants:
        raise InvalidValue(
            f"variant={choice!r}: expected one of {', '.join(map(str, variants))} (or no variant: all of them)"
        )


def _mode_name(mode: Any) -> str:
    """``hydra.mode`` (a ``RunMode`` in a job's config, a string in a hand-made one) as its name."""
    return str(getattr(mode, "name", mode))


def check_data_parallel(cfg: DictConfig, hydra_cfg: Any = None) -> None:
    """A multi-process strategy is one our jobs can run under, and not started from inside a local sweep.

    ``trainer.strategy=ddp`` with several devices re-runs the job's command once per rank (Lightning's
    launcher): a sweep's jobs would each start a sweep. On a cluster ``hydra/launcher=submitit_slurm`` with
    one task per device (SLURM starts the ranks) is the way to sweep data-parallel jobs. ``hydra_cfg``: the
    job's Hydra node (the task function's config has none), else ``cfg.hydra``.
    """
    hydra_cfg = hydra_cfg if hydra_cfg is not None else OmegaConf.select(cfg, "hydra", default=None)
    strategy = str(OmegaConf.select(cfg, "trainer.strategy", default="auto"))
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    if spawns_inside_the_fit(strategy):
        raise InvalidValue(
            f"trainer.strategy={strategy}: not supported; use trainer.strategy=ddp (every rank runs the "
            "whole job, rank 0 writes its files)"
        )
    several = str(devices) not in ("1", "None")
    launcher = str(OmegaConf.select(hydra_cfg, "launcher._target_", default="")) if hydra_cfg else ""
    mode = OmegaConf.select(hydra_cfg, "mode", default=None) if hydra_cfg else None
    if "ddp" in strategy and several and _mode_name(mode) == "MULTIRUN" and "SlurmLauncher" not in launcher:
        raise InvalidValue(
            f"trainer.strategy={strategy} with trainer.devices={devices} inside a local multirun: each job "
            "would re-launch the sweep's command per rank. Sweep data-parallel jobs on SLURM "
            f"(hydra/launcher=submitit_slurm hydra.launcher.tasks_per_node={devices} "
            f"hydra.launcher.gpus_per_node={devices}), or run them one at a time"
        )


def check_required(cfg: DictConfig) -> None:
    """Every mandatory value (``???`` in a config file) is given."""
    # Hydra's own node has run-time values (hydra.job.num) filled in later; interpolations are not resolved.
    missing = [key for key in _missing_keys(cfg) if key.split(".")[0] != "hydra"]
    if missing:
        raise InvalidValue(
            f"{missing[0]} has no value and needs one: add {missing[0]}=... to the command line "
            "(its config file says what it takes)"
        )


def _missing_keys(node: DictConfig | ListConfig, prefix: str = "") -> list[str]:
    """Dotted keys of the literal ``???`` values under ``node``, without resolving any interpolation."""
    found: list[str] = []
    keys = range(len(node)) if isinstance(node, ListConfig) else list(node.keys())
    for key in keys:
        child = node._get_node(key)
        name = f"{prefix}{key}"
        if isinstance(child, DictConfig | ListConfig):
            if not child._is_missing() and not child._is_none() and not child._is_interpolation():
                found += _missing_keys(child, f"{name}.")
            elif child._is_missing():
                found.append(name)
        elif child is not None and not child._is_interpolation() and child._is_missing():
            found.append(name)
    return found


def check_values(cfg: DictConfig) -> None:
    """Apply :data:`RULES` to the keys ``cfg`` has."""
    for key, rule in RULES.items():
        if OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False) is _ABSENT:
            continue
        rule(key, OmegaConf.select(cfg, key, throw_on_missing=False))


_ABSENT = object()


def overridden_keys(overrides: Iterable[str], groups: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split command-line overrides into config-group choices (``model=gaussian_mdn``, kept as written) and
    the dotted keys of value overrides (``trainer.max_steps``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    group_names = set(groups)
    choices: list[str] = []
    keys: list[str] = []
    for text, parsed in zip(
        overrides, OverridesParser.create().parse_overrides(list(overrides)), strict=True
    ):
        key = parsed.key_or_group
        if key in group_names or parsed.package is not None:
            choices.append(text)
        elif not parsed.is_delete():
            keys.append(key)
    return choices, keys


def validate(
    cfg: DictConfig, baseline: DictConfig | None, keys: Iterable[str], hydra_cfg: Any = None
) -> None:
    """All checks of a job's config: the run id, overridden values' types (against ``baseline``, the same
    experiment composed without value overrides) and :data:`RULES`."""
    check_run_id(cfg.run_id)
    for key in ("name", "tier"):
        check_run_id(cfg.get(key), key)
    if cfg.get("resume") and cfg.get("overwrite"):
        raise InvalidValue("resume=true and overwrite=true: choose one (continue the run, or replace it)")
    check_required(cfg)
    if baseline is not None:
        check_types(cfg, baseline, keys)
    check_values(cfg)
    check_variant(cfg)
    check_data_parallel(cfg, hydra_cfg)


def describe_existing(run_dir: Path) -> str:
    """A one-line account of what is already in ``run_dir`` (its status, from run_info.json)."""
    import json

    info_path = run_dir / "run_info.json"
    try:
        info = json.loads(info_path.read_text())
        return f"{info.get('status', 'unknown status')}, started {info.get('start_time', '?')}"
    except (OSError, ValueError):
        return "not a tracked run"


def claim_run_dir(run_dir: Path, run_id: str, resume: bool, overwrite: bool) -> str:
    """Decide what a job may do with ``run_dir`` before anything is written there.

    Returns ``"new"`` (it does not exist or is empty), ``"resume"`` (it exists and ``resume``) or
    ``"overwrite"`` (it existed and was removed). Raises :class:`ConfigError` for an existing run id
    without ``resume`` or ``overwrite``.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return "new"
    if resume:
        return "resume"
    if overwrite:
        shutil.rmtree(run_dir)
        return "overwrite"
    raise ConfigError(
        f"run_id={run_id!r} already exists ({run_dir}: {describe_existing(run_dir)}). Choose another "
        "run_id, continue it with resume=true, or replace it with overwrite=true"
    )
