"""Composite experiments: run other experiments' pipelines as tracked sub-runs of one job.

Each sub-run gets its own directory inside the parent's (``<run_dir>/<experiment>/``), its own
``config.yaml``, ``run_info.json``, ``run.log`` and manifest lines, with ``run_id``
``<parent run_id>/<experiment>`` and ``parent_run_id`` set, so the results table lists it like any run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from latentdyn.pipeline.common import plain
from latentdyn.tracking.run import tracked_run

log = logging.getLogger(__name__)


def sub_config(
    parent: DictConfig,
    experiment: str,
    tier: str,
    base: DictConfig | None = None,
    label: str | None = None,
    **values: Any,
) -> DictConfig:
    """Config of a sub-run of ``experiment``: ``base`` (its own composed config) or else the parent's, with its
    own name, tier, run id and run dir inside the parent's (``<run_dir>/<label>``, run id
    ``<run_id>/<label>``; the label defaults to the experiment's name), plus ``values`` (dotted keys)."""
    label = label or experiment
    # Unresolved, so that interpolations of run_dir / run_id (the logger's save_dir, ...) follow the sub-run.
    cfg = OmegaConf.create(OmegaConf.to_container(base if base is not None else parent, resolve=False))
    with open_dict(cfg):
        cfg.name = experiment
        cfg.tier = tier
        cfg.run_dir = str(Path(parent.run_dir) / label)
        cfg.run_id = f"{parent.run_id}/{label}"
        for key, value in values.items():
            OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def run_sub_experiment(
    parent: DictConfig,
    experiment: str,
    pipeline: Callable[[DictConfig], Mapping[str, Any]],
    tier: str = "tier1",
    base: DictConfig | None = None,
    label: str | None = None,
    **values: Any,
) -> tuple[DictConfig, dict[str, Any]]:
    """Run ``pipeline`` as a tracked sub-run (see :func:`sub_config`); returns its config and key metrics
    (exceptions propagate)."""
    cfg = sub_config(parent, experiment, tier, base, label, **values)
    log.info("sub-run %s -> %s", cfg.run_id, cfg.run_dir)
    with tracked_run(
        run_dir=Path(cfg.run_dir),
        manifest_path=Path(cfg.paths.manifest),
        run_id=str(cfg.run_id),
        experiment=experiment,
        tier=tier,
        config=plain(cfg),
        parent_run_id=str(parent.run_id),
    ) as run:
        run.result = dict(pipeline(cfg))
    return cfg, dict(run.result)


def completed_runs(manifest: Path) -> dict[str, dict[str, Any]]:
    """Key metrics of the runs whose latest attempt completed, by run id (what ``resume`` skips)."""
    from latentdyn.tracking.manifest import iter_records
    from latentdyn.tracking.results import summarize_runs

    return {r.run_id: r.metrics for r in summarize_runs(iter_records(manifest)) if r.status == "completed"}


def compose_app(overrides: Sequence[str]) -> DictConfig:
    """The app's config composed with ``overrides``, as the CLI would (inside a Hydra job or outside)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from latentdyn.config import conf_dir

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="config", overrides=list(overrides))
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def compose_experiment(experiment: str, overrides: list[str]) -> DictConfig:
    """Compose ``experiment=<experiment>`` with ``overrides`` from the app's config tree, as the CLI would."""
    return compose_app([f"experiment={experiment}", *overrides])


def command_line_overrides() -> list[str]:
    """The running Hydra job's command-line overrides (none outside the CLI)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def group_config(group: str, choice: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The node of config group ``group`` as ``group=choice`` composes it, with those of ``overrides`` that set
    keys under ``group.`` applied where the chosen node has the key (``+``/``++`` ones always).

    For pipelines that build several members of one group in a run (Exp 3's representations): the user's
    ``representation.pretrained=false`` applies to each. An override whose key no member has is an error of
    the caller's (see :func:`unused_group_overrides`). Unresolved: interpolations resolve where it is put.
    """
    base = compose_app([f"{group}={choice}"])[group]
    applicable = [o for o in group_overrides(group, overrides) if _applies(base, group, o)]
    if not applicable:
        return base
    return compose_app([f"{group}={choice}", *applicable])[group]


def group_overrides(group: str, overrides: Sequence[str]) -> list[str]:
    """Those of ``overrides`` that set a key under ``group.`` (``representation.pretrained=false``)."""
    return [o for o in overrides if o.lstrip("+~").split("=", 1)[0].startswith(f"{group}.")]


def _applies(node: DictConfig, group: str, override: str) -> bool:
    key = override.lstrip("+~").split("=", 1)[0][len(group) + 1 :]
    return override.startswith("+") or OmegaConf.select(node, key, default=_MISSING) is not _MISSING


_MISSING = object()


def unused_group_overrides(group: str, choices: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """Overrides of ``group.*`` keys that none of ``choices`` has (a typo, or a key of another member)."""
    nodes = [compose_app([f"{group}={choice}"])[group] for choice in choices]
    return [o for o in group_overrides(group, overrides) if not any(_applies(n, group, o) for n in nodes)]


def _is_config_group(key: str) -> bool:
    from latentdyn.config import conf_dir

    return (conf_dir() / key.split("@")[0]).is_dir()


def inherited_overrides(parent: DictConfig, own_keys: tuple[str, ...]) -> list[str]:
    """Command-line overrides a sub-experiment inherits from its parent job: the parent's own overrides (when
    run by the CLI) minus the parent-only keys, plus where outputs and caches go and the seed."""
    from hydra.core.hydra_config import HydraConfig

    overrides: list[str] = []
    if HydraConfig.initialized():
        for item in HydraConfig.get().overrides.task:
            key = item.split("=", 1)[0].lstrip("+~")
            if key in own_keys or key.split(".")[0] in own_keys:
                continue
            # A value one sub-experiment lacks (exp3's `representations` in exp1) is added there, not an error.
            overrides.append(item if _is_config_group(key) or item.startswith(("+", "~")) else f"++{item}")
    overrides += [
        f"paths.root_dir={parent.paths.root_dir}",
        f"paths.cache_dir={parent.paths.cache_dir}",
        f"seed={parent.seed}",
    ]
    return overrides
