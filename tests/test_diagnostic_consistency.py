"""The injection diagnostic's teacher-forced steps equal the Phase 1 battery's one-step evaluation on the same windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentdyn.diagnostics.battery import battery_metrics
from latentdyn.diagnostics.injection import InjectionConfig, rollout_geometry, run_injection, sample_starts
from latentdyn.models.net import DynamicsNet

W, D, K = 4, 6, 5


@pytest.mark.parametrize(("head", "k"), [("VMFLogNormalHead", 1), ("GaussianMDNHead", 2)])
def test_a_teacher_step_metrics_equal_the_battery_on_the_same_windows(head: str, k: int) -> None:
    torch.manual_seed(0)
    net = DynamicsNet(
        D,
        W,
        k,
        {"_target_": "latentdyn.models.backbones.MLPBackbone", "hidden": 32, "layers": 2},
        {"_target_": f"latentdyn.models.heads.{head}"},
        horizon_mode="lag",
    ).eval()
    g = torch.Generator().manual_seed(1)
    trajectories = {
        f"utt{u}": torch.cumsum(0.3 * torch.randn(length, D, generator=g), dim=0)
        for u, length in enumerate((30, 45, 26))
    }
    baseline = net.baseline.fit([t[1:] - t[:-1] for t in trajectories.values()])
    cfg = InjectionConfig(
        modes=["A_teacher"],
        k_steps=K,
        n_utterances=3,
        starts_per_utterance=4,
        inject_after_periodic=[2],
        inject_after_one_shot=[1],
        bank_size=0,
        seed=5,
    )
    starts = sample_starts(list(trajectories.items()), rollout_geometry(net), cfg)
    assert len(starts.starts) == 12
    result = run_injection(net, starts.segments, cfg, baseline, n_utterances=len(starts.utterances))
    np.testing.assert_array_equal(result.per_start["state_err"], 0.0)
    for s in range(1, K + 1):
        # The battery's lag-k window of target frame t = t0 + s - 1, built from the utterances: context
        # x[t-k-W+1 .. t-k], delta x[t] - x[t-1], state x[t-1].
        windows = []
        for utt, t0 in starts.starts:
            x, t = trajectories[utt], t0 + s - 1
            context = x[t - k - W + 1 : t - k + 1]
            windows.append(
                {
                    "context": context,
                    "target_delta": x[t] - x[t - 1],
                    "last": x[t - 1],
                    "target": x[t],
                    "prev": context[-2],
                }
            )
        batch = {key: torch.stack([w[key] for w in windows]) for key in windows[0]}
        battery = battery_metrics(net, [batch], unconditional=baseline, predict="median")
        assert battery["n_windows"] == len(starts.starts)
        for name in ("nll", "nll_baseline", "dnll", "cos", "mag_ratio"):
            injected = result.per_start[name][0, :, s - 1].mean()
            assert injected == pytest.approx(battery[name], rel=1e-5, abs=1e-6), (name, s)
