"""Figures: a title naming the experiment, run and horizon; bands said in words; legends clear of the data.

Checked on the figures' metadata (no screenshots): every test records the Figures the code saves (through
``Figure.savefig``) and reads their suptitle, legend texts and layout. Inputs are synthetic and tiny.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox
from omegaconf import open_dict

from latentdyn.diagnostics.injection import METRICS, InjectionConfig, InjectionResult
from latentdyn.representations.pca import PCAFit

RUN_ID = "2026-12-01_19-20"
SMOKE = ["debug=smoke", "logger=none", f"run_id={RUN_ID}"]
MODES = ["A_teacher", "D_rollout"]
UTTERANCES, STARTS_PER_UTTERANCE, K_STEPS = 4, 3, 5
N_STARTS = UTTERANCES * STARTS_PER_UTTERANCE


@pytest.fixture
def saved_figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, Figure]:
    """Every Figure the code saves, by file name (the figure itself, so its artists can be inspected)."""
    from latentdyn.diagnostics import plots

    figures: dict[str, Figure] = {}
    rendered: list[Figure] = []
    original_savefig, original_write = Figure.savefig, plots.write_bytes_atomic

    def recording_savefig(self: Figure, fname: Any, *args: Any, **kwargs: Any) -> Any:
        rendered.append(self)
        return original_savefig(self, fname, *args, **kwargs)

    def recording_write(path: Path, data: bytes) -> None:
        figures[Path(path).name] = rendered[-1]
        original_write(path, data)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    monkeypatch.setattr(plots, "write_bytes_atomic", recording_write)
    return figures


def fake_injection_result(
    band: str = "percentile", horizon: int = 1, finite: tuple[str, ...] = ("dnll",)
) -> InjectionResult:
    """An :class:`InjectionResult` of random per-start values: ``N_STARTS`` starts, ``K_STEPS`` steps.

    Metrics not in ``finite`` are NaN (as ``manifold_dist`` without a bank), so they get no figure: each
    saved figure costs a render, and one is enough to check a caller's title."""
    cfg = InjectionConfig(
        modes=MODES,
        k_steps=K_STEPS,
        n_utterances=UTTERANCES,
        starts_per_utterance=STARTS_PER_UTTERANCE,
        inject_after_periodic=[2],
        band=band,
        band_level=0.8,
        n_bootstrap=200,
        bank_size=0,
    )
    rng = np.random.default_rng(0)
    per_start = {name: rng.random((len(MODES), N_STARTS, K_STEPS)) for name in METRICS}
    for name in set(METRICS) - set(finite):
        per_start[name][:] = np.nan
    per_step = [
        {"mode": mode, "step": s + 1, "metric": name, "mean": mean, "lo": mean - 0.1, "hi": mean + 0.1}
        for m, mode in enumerate(MODES)
        for name in METRICS
        for s, mean in enumerate(per_start[name][m].mean(axis=0).tolist())
    ]
    return InjectionResult(
        modes=MODES,
        per_start=per_start,
        per_step=per_step,
        config=cfg,
        window_size=3,
        horizon_k=horizon,
        frames_per_step=1,
        n_utterances=UTTERANCES,
    )


def _legend_texts(fig: Figure) -> list[str]:
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + list(fig.legends)
    assert legends, "the figure has no legend"
    return [t.get_text() for legend in legends for t in (*legend.get_texts(), legend.get_title())]


def assert_legends_clear_of_data(fig: Figure) -> None:
    """Every legend's box (display coords, after layout) is disjoint from every axes' data area."""
    fig.draw_without_rendering()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + list(fig.legends)
    assert legends, "the figure has no legend"
    for legend in legends:
        box = legend.get_window_extent()
        for ax in fig.axes:
            area = ax.get_window_extent()
            inter = Bbox.intersection(box, area)
            overlap = 0.0 if inter is None else inter.width * inter.height
            assert overlap < 1.0, f"legend {box} overlaps the data area {area}"


def assert_titled(fig: Figure, experiment: str, run_id: str, horizon: int | None) -> str:
    title = fig.get_suptitle()
    assert experiment in title and run_id in title, title
    if horizon is not None:
        assert f"k={horizon}" in title, title
    return title


# --- the helpers -------------------------------------------------------------------------------------------


def test_figure_title_names_experiment_run_and_horizon() -> None:
    from latentdyn.diagnostics.plots import figure_title

    assert figure_title("exp2_injection", RUN_ID, horizon=4) == f"exp2_injection · run {RUN_ID} · k=4"
    assert (
        figure_title("exp4_linear_readout", RUN_ID, extra="pca32")
        == f"exp4_linear_readout · run {RUN_ID} · pca32"
    )
    assert figure_title("exp3", 7, horizon=1, extra="mel") == "exp3 · run 7 · k=1 · mel"
    for bad in ({"experiment": ""}, {"run_id": " "}, {"horizon": 0}, {"horizon": 1.5}, {"horizon": True}):
        kwargs = {"experiment": "exp2_injection", "run_id": RUN_ID, **bad}
        with pytest.raises(ValueError):
            figure_title(**kwargs)


def test_band_label_says_what_the_band_is_and_over_how_many_starts() -> None:
    from latentdyn.diagnostics.plots import band_label

    percentile = band_label("percentile", 0.9, 128).replace("\n", " ")
    assert "5–95 % percentiles" in percentile and "128 starts" in percentile
    assert "10–90 %" in band_label("percentile", 0.8, 3)
    boot = band_label("bootstrap", 0.95, 128, n_bootstrap=1000).replace("\n", " ")
    assert "95 % bootstrap CI of the mean" in boot and "128 starts" in boot and "1000 resamples" in boot
    with pytest.raises(ValueError, match="n_bootstrap"):
        band_label("bootstrap", 0.9, 128)
    with pytest.raises(ValueError, match="band"):
        band_label("stderr", 0.9, 128)
    with pytest.raises(ValueError, match="level"):
        band_label("percentile", 1.0, 128)
    with pytest.raises(ValueError, match="n_starts"):
        band_label("percentile", 0.9, 0)


# --- the injection curves ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("band", "words"),
    [("percentile", "10–90 % percentiles"), ("bootstrap", "80 % bootstrap CI of the mean")],
)
def test_injection_figures_are_titled_banded_and_legends_outside(
    tmp_path: Path, saved_figures: dict[str, Figure], band: str, words: str
) -> None:
    result = fake_injection_result(band=band, horizon=4, finite=("dnll", "state_err"))
    title = f"exp2_injection · run {RUN_ID} · k=4"
    paths = result.write(tmp_path, frame_rate=12.5, title=title)
    pngs = [p for p in paths if p.suffix == ".png"]
    # A metric with no finite value (here all but two) gets no figure.
    assert {p.name for p in pngs} == {"injection_dnll.png", "injection_state_err.png"}
    for png in pngs:
        fig = saved_figures[png.name]
        metric = png.stem.removeprefix("injection_")
        assert assert_titled(fig, "exp2_injection", RUN_ID, 4).endswith(metric)
        texts = " ".join(_legend_texts(fig)).replace("\n", " ")
        assert words in texts and f"{N_STARTS} starts" in texts, texts
        assert set(MODES) <= set(_legend_texts(fig))
        assert_legends_clear_of_data(fig)
        # The PNG carries the title and the band caption as text chunks, for whoever finds the file alone.
        from PIL import Image

        with Image.open(png) as image:
            assert image.text["Title"] == fig.get_suptitle()
            assert words in image.text["Description"].replace("\n", " ")


def test_injection_axes_say_their_units() -> None:
    from latentdyn.diagnostics.plots import injection_figure

    result = fake_injection_result(finite=tuple(METRICS))
    labels: dict[str, str] = {}
    for metric in ("dnll", "nll", "state_err", "mse", "manifold_dist"):
        fig = injection_figure(
            result.per_step, metric, title="exp2_injection · run r · k=2", band="band", frames_per_step=2
        )
        labels[metric] = fig.axes[0].get_ylabel()
        assert fig.axes[0].get_xlabel() == "rollout step (2 frames each)"
    assert "nats" in labels["dnll"] and "nats" in labels["nll"]
    assert all("latent units" in labels[m] for m in ("state_err", "mse", "manifold_dist"))


def test_injection_figures_need_a_title(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="title"):
        fake_injection_result().write(tmp_path, title="")


# --- the callers -------------------------------------------------------------------------------------------


def test_exp2_titles_with_name_run_id_and_horizon(
    compose_cfg, monkeypatch: pytest.MonkeyPatch, saved_figures: dict[str, Figure]
) -> None:
    from latentdyn.experiments import exp2_injection

    cfg = compose_cfg(["experiment=exp2_injection", *SMOKE, "horizon_k=3", "checkpoint=unused.ckpt"])
    result = fake_injection_result(horizon=3)
    # A stand-in for the module exp2 loads its checkpoint with: the real one imports Lightning (~10 s).
    fake_dynamics = ModuleType("latentdyn.models.dynamics")
    fake_dynamics.load_dynamics = lambda path: SimpleNamespace(net=None, horizon=3, run_config={})
    monkeypatch.setitem(sys.modules, "latentdyn.models.dynamics", fake_dynamics)
    monkeypatch.setattr(exp2_injection, "dynamics_checkpoint", lambda *args: Path("unused.ckpt"))
    monkeypatch.setattr(exp2_injection, "store_of_checkpoint", lambda *args: SimpleNamespace(frame_rate=12.5))
    monkeypatch.setattr(exp2_injection, "injection_diagnostic", lambda *args: result)
    exp2_injection.run(cfg)
    assert saved_figures
    for fig in saved_figures.values():
        assert_titled(fig, "exp2_injection", RUN_ID, 3)


def _fake_model(horizon: int) -> SimpleNamespace:
    return SimpleNamespace(net=None, horizon=horizon)


def test_exp3_titles_with_name_run_id_representation_and_horizon(
    compose_cfg, monkeypatch: pytest.MonkeyPatch, saved_figures: dict[str, Figure]
) -> None:
    from latentdyn.experiments import exp3_rep_compare as exp3

    cfg = compose_cfg(["experiment=exp3_rep_compare", *SMOKE, "horizons=[1]"])
    store = SimpleNamespace(frame_rate=12.5, dim=8)
    monkeypatch.setattr(exp3, "prepare_latent_store", lambda cfg: store)
    monkeypatch.setattr(exp3, "train_horizon", lambda cfg, store, k, logger: (_fake_model(k), None, None))
    monkeypatch.setattr(exp3, "model_battery", lambda *args: [])
    monkeypatch.setattr(exp3, "injection_diagnostic", lambda *args: fake_injection_result())
    exp3.compare_one(cfg, "mel", logger=None)
    assert saved_figures
    for fig in saved_figures.values():
        assert "mel" in assert_titled(fig, "exp3_rep_compare", RUN_ID, 1)


def test_exp4_titles_its_injection_curves_and_explained_variance(
    compose_cfg, monkeypatch: pytest.MonkeyPatch, saved_figures: dict[str, Figure], tmp_path: Path
) -> None:
    from latentdyn.experiments import exp4_linear_readout as exp4

    cfg = compose_cfg(["experiment=exp4_linear_readout", *SMOKE])
    store = SimpleNamespace(frame_rate=12.5, dim=4, root=tmp_path / "store", meta={"representation": "mel"})
    monkeypatch.setattr(exp4, "train_horizon", lambda cfg, store, k, logger: (_fake_model(k), None, None))
    monkeypatch.setattr(exp4, "model_battery", lambda *args: [])
    monkeypatch.setattr(exp4, "horizon_columns", lambda *args: {})
    monkeypatch.setattr(exp4, "raw_scale_is_isometric", lambda store: True)
    monkeypatch.setattr(exp4, "injection_diagnostic", lambda *args: fake_injection_result())
    exp4.evaluate_variant(cfg, "pca4", store, logger=None)
    assert saved_figures
    for fig in saved_figures.values():
        assert "pca4" in assert_titled(fig, "exp4_linear_readout", RUN_ID, 1)

    saved_figures.clear()
    ratio = np.array([0.5, 0.3, 0.15, 0.05])
    fit = PCAFit(
        components=np.eye(4),
        mean=np.zeros(4),
        explained_variance=ratio * 2.0,
        explained_variance_ratio=ratio,
        store_mean=np.zeros(4),
        store_std=np.ones(4),
        n_samples=100,
        n_chunks=1,
        source="store",
    )
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / "exp4")
    Path(cfg.run_dir).mkdir()
    exp4.write_explained_variance(fit, [2], Path(cfg.run_dir), title=exp4.explained_variance_title(cfg))
    fig = saved_figures["explained_variance.png"]
    assert "explained variance" in assert_titled(fig, "exp4_linear_readout", RUN_ID, None)
    assert_legends_clear_of_data(fig)


@pytest.mark.slow
def test_exp1b_titles_with_name_run_id_and_horizon(tmp_path: Path, saved_figures: dict[str, Figure]) -> None:
    from latentdyn.experiments import exp1_vmf, exp1b_vmf_rollout
    from latentdyn.pipeline.composite import run_sub_experiment
    from tests.conftest import compose_at

    def compose(name: str, *overrides: str):
        return compose_at(tmp_path, [f"experiment={name}", *SMOKE, *overrides], tmp_path / name)

    exp1_cfg = compose("exp1_vmf", "horizons=[1]")
    run_sub_experiment(exp1_cfg, "exp1_vmf", exp1_vmf.run, base=exp1_cfg)
    cfg = compose(
        "exp1b_vmf_rollout",
        "checkpoint=latest",
        "rollout.k_steps=2",
        "trainer.max_steps=2",
        "rollout.teacher_prob.ramp_steps=1",
        "rollout.warmup_steps=0",
    )
    exp1b_vmf_rollout.run(cfg)
    curves = {name: fig for name, fig in saved_figures.items() if name.startswith("injection_")}
    assert curves
    for fig in curves.values():
        assert_titled(fig, "exp1b_vmf_rollout", RUN_ID, 1)


# --- bands across seeds ------------------------------------------------------------------------------------


def test_ci_curves_shade_each_series_band_in_its_colour(
    tmp_path: Path, saved_figures: dict[str, Figure]
) -> None:
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import to_rgb

    from latentdyn.diagnostics.plots import seed_band_label
    from latentdyn.pipeline.seeds import plot_ci_curves

    words = seed_band_label(0.95, 3, 10_000).replace("\n", " ")
    assert "95 % bootstrap CI of the mean" in words and "3 seeds" in words and "10000 resamples" in words
    with pytest.raises(ValueError, match="n_seeds"):
        seed_band_label(0.95, 0, 10)
    series = {
        "raw": ([1, 2, 4], ([-3.0, -2.0, -1.0], [-3.5, -2.4, -1.2], [-2.5, -1.5, -0.9])),
        "pca2": ([1, 2, 4], ([-1.0, -0.5, -0.2], [-1.2, -0.6, -0.3], [-0.8, -0.4, -0.1])),
    }
    title = f"exp4_linear_readout · run {RUN_ID}"
    path = plot_ci_curves(
        series, tmp_path / "dnll.png", title=title, xlabel="k", ylabel="ΔNLL", n_seeds=3, logx_base=2
    )
    fig = saved_figures[path.name]
    assert_titled(fig, "exp4_linear_readout", RUN_ID, None)
    (ax,) = fig.axes
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2
    lines = {line.get_label(): line for line in ax.get_lines()}
    for band, name in zip(bands, series, strict=True):
        assert np.allclose(band.get_facecolor()[0][:3], to_rgb(lines[name].get_color()))
        ys = band.get_paths()[0].vertices[:, 1]
        assert ys.min() == pytest.approx(min(series[name][1][1])) and ys.max() == pytest.approx(
            max(series[name][1][2])
        )
    texts = " ".join(_legend_texts(fig)).replace("\n", " ")
    assert words in texts and "raw" in texts and "pca2" in texts
    assert_legends_clear_of_data(fig)
    # Nothing finite: no figure.
    empty = {"raw": ([1], ([None], [None], [None]))}
    assert plot_ci_curves(empty, tmp_path / "e.png", title=title, xlabel="k", ylabel="y", n_seeds=2) is None
