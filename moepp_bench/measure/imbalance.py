"""Load-imbalance metrics of one expert-load vector (slots per expert), each a plain number.

All are scale-free (multiplying every load by c changes nothing) and computed in float64:
  cv              population std / mean; 0 when balanced
  max_over_mean   max / mean; 1 when balanced
  maxvio          (max - mean) / mean, the MaxVio of the loss-free-balancing literature; 0 when balanced
  gini            Gini coefficient of the loads; 0 when balanced, (n-1)/n when one expert takes everything
  entropy         Shannon entropy of the load shares, in nats; ln(n) when balanced
  entropy_norm    entropy / ln(n), in [0, 1]
  jain            Jain's fairness index (sum x)^2 / (n sum x^2), in [1/n, 1]; 1 when balanced
An empty vector or one with no load gives NaN everywhere (there is nothing to be balanced).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

METRICS = ("cv", "max_over_mean", "maxvio", "gini", "entropy", "entropy_norm", "jain")


def imbalance(loads: Sequence[float] | torch.Tensor) -> dict[str, float]:
    x_N = torch.as_tensor(loads, dtype=torch.float64).reshape(-1)
    n = x_N.numel()
    total = x_N.sum().item() if n else 0.0
    if n == 0 or total <= 0:
        return {name: math.nan for name in METRICS}
    mean = total / n
    p_N = x_N / total
    nonzero = p_N[p_N > 0]
    entropy = -(nonzero * nonzero.log()).sum().item()
    sorted_N = torch.sort(x_N).values
    rank_N = torch.arange(1, n + 1, dtype=torch.float64)
    return {
        "cv": x_N.std(correction=0).item() / mean,
        "max_over_mean": x_N.max().item() / mean,
        "maxvio": (x_N.max().item() - mean) / mean,
        "gini": ((2 * rank_N - n - 1) * sorted_N).sum().item() / (n * total),
        "entropy": entropy,
        "entropy_norm": entropy / math.log(n) if n > 1 else math.nan,
        "jain": total**2 / (n * x_N.square().sum().item()),
    }


def maxvio_against(loads: Sequence[float] | torch.Tensor, target_share: Sequence[float] | torch.Tensor) -> float:
    """max_i load_i / target_i - 1, with target_i = total * target_share_i / sum(target_share).

    With the tau-weighted target (FFN experts tau, zero-computation experts 1) this measures how far a MoE++
    layer is from the balance its heterogeneous loss aims at, rather than from an even split that it never seeks.
    """
    x_N = torch.as_tensor(loads, dtype=torch.float64).reshape(-1)
    w_N = torch.as_tensor(target_share, dtype=torch.float64).reshape(-1)
    if x_N.shape != w_N.shape:
        raise ValueError(f"loads ({x_N.numel()}) and target shares ({w_N.numel()}) differ in length")
    total = x_N.sum().item()
    if x_N.numel() == 0 or total <= 0 or (w_N <= 0).any():
        return math.nan
    target_N = total * w_N / w_N.sum()
    return (x_N / target_N).max().item() - 1.0
