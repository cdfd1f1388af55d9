"""The analytic all-to-all counts (moepp_bench.measure.comm_model), checked by hand and by enumeration."""

from __future__ import annotations

from itertools import combinations
from math import comb

import pytest
import torch

from moepp_bench.measure.comm_model import (bytes_per_token_at_balance, dedup_bytes_per_token_at_balance,
                                             routing_a2a_rows)


def test_rows_of_a_hand_made_routing():
    # 4 FFN experts over 2 ranks (rank 0: {0, 1}, rank 1: {2, 3}); expert 4 is zero-computation.
    rank0 = torch.tensor([[0, 2], [2, 3], [4, 1]])  # remote slots: 2 | 2, 3 | none
    rank1 = torch.tensor([[0, 1], [2, 4], [3, 0]])  # remote slots: 0, 1 | none | 0
    rows = routing_a2a_rows([rank0, rank1], n_ffn=4)
    assert rows.slot == 3 + 3
    assert rows.dedup == 2 + 2  # token (2, 3) and token (0, 1) each go to one rank once
    assert rows.send_by_rank == (3, 3) and rows.recv_by_rank == (3, 3)
    assert rows.ffn_slots == 10 and rows.slots == 12


def test_uneven_sharding_is_refused():
    with pytest.raises(ValueError, match="do not shard evenly"):
        routing_a2a_rows([torch.zeros(1, 2, dtype=torch.long)] * 3, n_ffn=4)


def test_bytes_at_balance():
    assert bytes_per_token_at_balance(2, 1.0, 1, 768, 2) == 0
    assert bytes_per_token_at_balance(2, 0.75, 4, 768, 2) == 2 * 0.75 * 3 / 4 * 768 * 2
    assert bytes_per_token_at_balance(2, 0.5, 256, 1024, 4) == pytest.approx(2 * 0.5 * 255 / 256 * 1024 * 4)


@pytest.mark.parametrize("E, P, K, rho", [(16, 2, 2, 0.75), (16, 4, 2, 0.3), (8, 8, 2, 0.5), (8, 4, 3, 0.6),
                                          (4, 8, 2, 0.5)])
def test_dedup_expectation_matches_enumeration(E, P, K, rho):
    """Average over every set of k distinct experts (k ~ Binomial(K, rho)) and every home rank."""
    owner = [e * P // E if P <= E else e for e in range(E)]  # P > E: expert e alone on rank e
    expected = 0.0
    for k in range(K + 1):
        p_k = comb(K, k) * rho**k * (1 - rho) ** (K - k)
        subsets = list(combinations(range(E), k))
        remote = sum(len({owner[e] for e in s} - {home}) for s in subsets for home in range(P))
        expected += p_k * remote / (len(subsets) * P)
    assert dedup_bytes_per_token_at_balance(K, rho, E, P, 1, 1) == pytest.approx(expected)


def test_dedup_undefined_for_a_layout_that_cannot_exist():
    assert dedup_bytes_per_token_at_balance(2, 0.5, 16, 3, 768, 2) is None
