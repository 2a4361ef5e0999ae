"""The injection diagnostic's teacher-forced step equals the Phase 1 battery's one-step evaluation."""

from __future__ import annotations

import pytest
import torch

from latentdyn.diagnostics.battery import battery_metrics
from latentdyn.diagnostics.injection import InjectionConfig, run_injection
from latentdyn.models.net import DynamicsNet

W, D, H, N = 4, 6, 5, 12


@pytest.mark.parametrize("head", ["VMFLogNormalHead", "GaussianMDNHead"])
def test_a_teacher_per_step_error_equals_the_battery_one_step_error(head: str) -> None:
    torch.manual_seed(0)
    net = DynamicsNet(
        D,
        W,
        1,
        {"_target_": "latentdyn.models.backbones.MLPBackbone", "hidden": 32, "layers": 2},
        {"_target_": f"latentdyn.models.heads.{head}"},
    ).eval()
    segments = torch.cumsum(0.3 * torch.randn(N, W + H, D), dim=1)
    cfg = InjectionConfig(
        modes=["A_teacher"],
        horizon=H,
        n_starts=N,
        period=2,
        inject_step=2,
        predict="mean",
        n_samples=1,
        temperature=1.0,
        bank_size=0,
        divergence_factor=2.0,
        split="test",
        seed=0,
    )
    result = run_injection(net, segments, cfg, bank=None)
    for s in range(H):
        # The battery's windows for step s: GT context ending at frame W-1+s, target frame W+s.
        context = segments[:, s : s + W]
        batch = {
            "context": context,
            "last": context[:, -1],
            "prev": context[:, -2],
            "target": segments[:, W + s],
            "target_delta": segments[:, W + s] - context[:, -1],
        }
        battery = battery_metrics(net, [batch])
        assert result.per_start["mse"][0, :, s].mean() == pytest.approx(battery["mse"], rel=1e-5)
        assert result.per_start["nll"][0, :, s].mean() == pytest.approx(battery["nll_per_dim"], rel=1e-5)
