"""Helpers for the moepp tests: tolerances, layers with clear routing margins, gradient comparison, and the
official-format fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moepp import MoEConfig, MoELayer
from moepp.reference import ReferenceParams

# Tolerances, as max |actual - expected| over max |expected| (so they hold at any output scale).
# float32: the fast layer sums in another order than the float64 reference; measured errors are below 6e-7
# relative, so 5e-6 keeps ~10x headroom while any real bug (a missing gate, scale or expert) shows up as O(1).
# bfloat16: 8 mantissa bits, so each rounded op costs up to 2^-8 ~ 0.4%; a layer chains ~5 of them (input cast,
# up-projection, silu*up, down-projection, gate multiply) and backward as many again. Measured errors reach
# 1.1e-2 relative; 3e-2 keeps ~3x headroom.
TOL = {torch.float32: 5e-6, torch.bfloat16: 3e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    actual = torch.zeros_like(expected) if actual is None else actual
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    scale = e.abs().max().item()
    err = (a - e).abs().max().item()
    assert err <= TOL[dtype] * max(scale, 1e-30), f"{what}: max error {err:.3g} vs scale {scale:.3g} ({dtype})"


def make_layer(cfg: MoEConfig, dtype: torch.dtype = torch.float32, seed: int = 0) -> MoELayer:
    """A layer whose router logits have std ~2, so top-k choices have clear margins (no float near-ties between
    the fast router and the reference) and gates are not saturated."""
    torch.manual_seed(seed)
    layer = MoELayer(cfg)
    with torch.no_grad():
        for name, p in layer.router.named_parameters():
            fan_in = p.shape[1]
            p.normal_(0.0, (0.5 if "gate_map" in name else 2.0) / fan_in**0.5)
        layer.zc.const_wc.normal_(0.0, 1.0 / cfg.d_model**0.5)  # a1, a2 away from 1/2 each
        layer.ffn.w_up.normal_(0.0, 1.0 / cfg.d_model**0.5)
        layer.ffn.w_down.normal_(0.0, 1.0 / cfg.d_expert**0.5)
    return layer.to(dtype)


def grad_targets(layer: MoELayer) -> dict[str, torch.Tensor]:
    """Every parameter a test compares gradients for, by a readable name."""
    p = ReferenceParams.from_layer(layer)
    named = {"w_up": p.w_up_E2HD, "w_down": p.w_down_EDH, "const_v": p.const_v_CD, "const_wc": p.const_wc_C2D,
             "gate_map": p.gate_map_NN}
    if layer.cfg.router == "linear":
        named["router_w"] = p.router_w_ND
    else:
        named["router_w1"] = p.router_w1_MD
        named["router_w2"] = p.router_w2_NM
    return named


def grads(y: torch.Tensor, dy: torch.Tensor, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """d<y, dy>/d input for each input (None where the input did not take part)."""
    got = torch.autograd.grad(y, list(inputs.values()), grad_outputs=dy.to(y.dtype), allow_unused=True)
    return dict(zip(inputs, got))


REPO_ROOT = Path(__file__).resolve().parents[1]
# The two tiny checkpoints written by the official MoE++ code live beside the repository, not in it.
OFFICIAL_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"
OFFICIAL_FIXTURE_NAMES = ("official-code-defaults", "official-release-options")


def official_fixture(name: str) -> Path:
    """The fixture folder, or skip the test with the reason when the shared fixtures are absent."""
    path = OFFICIAL_FIXTURES / name
    if not (path / "expected.json").is_file():
        pytest.skip(f"official fixture {name} not found at {path} (it ships beside the repo in ../shared/fixtures)")
    return path
