"""All-to-all volume of expert parallelism, from a routing or from the balance tau drives to.

Layout: P ranks, rank r holds FFN experts [r*E/P, (r+1)*E/P) and its own tokens; zero-computation experts live on
every rank, so only FFN slots whose expert sits on another rank travel. Two dispatchers:
  slot   one row per (token, FFN expert) slot (what moepp.parallel sends)
  dedup  a token sent once per destination rank, however many of its experts live there
Combine sends the same rows back, so one direction is counted; a round trip is twice that.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

import torch


@dataclass(frozen=True)
class A2ARows:
    """Rows crossing ranks in one dispatch for a given routing (integers, from the routing alone)."""

    slot: int  # one row per remote FFN slot
    dedup: int  # one row per (token, remote rank holding at least one of its experts)
    send_by_rank: tuple[int, ...]  # slot rows each rank sends to others
    recv_by_rank: tuple[int, ...]  # slot rows each rank receives from others
    ffn_slots: int  # all FFN slots, local or not
    slots: int  # all slots


def routing_a2a_rows(topk_ids_by_rank: list[torch.Tensor], n_ffn: int) -> A2ARows:
    """Count what a dispatcher must move for this routing; topk_ids_by_rank[r] is rank r's [T_r, K] expert ids."""
    P = len(topk_ids_by_rank)
    if n_ffn % P:
        raise ValueError(f"{n_ffn} FFN experts do not shard evenly over {P} ranks")
    per_rank = n_ffn // P
    slot = dedup = ffn_slots = slots = 0
    send, recv = [0] * P, [0] * P
    for r, ids_TK in enumerate(topk_ids_by_rank):
        ids_TK = ids_TK.long().cpu()
        is_ffn_TK = ids_TK < n_ffn
        owner_TK = torch.where(is_ffn_TK, torch.div(ids_TK, per_rank, rounding_mode="floor"), -1)
        remote_TK = is_ffn_TK & (owner_TK != r)
        slot_rows = int(remote_TK.sum())
        slot += slot_rows
        send[r] += slot_rows
        for q, n in enumerate(torch.bincount(owner_TK[remote_TK], minlength=P).tolist()):
            recv[q] += n
        hit_TP = torch.zeros(ids_TK.shape[0], P, dtype=torch.bool)
        rows_T, cols_K = remote_TK.nonzero(as_tuple=True)
        hit_TP[rows_T, owner_TK[rows_T, cols_K]] = True
        dedup += int(hit_TP.sum())
        ffn_slots += int(is_ffn_TK.sum())
        slots += ids_TK.numel()
    return A2ARows(slot, dedup, tuple(send), tuple(recv), ffn_slots, slots)


def bytes_per_token_at_balance(top_k: int, ffn_share: float, world_size: int, d_model: int,
                               bytes_per_element: int) -> float:
    """Expected one-way dispatch bytes per token: K rho (P-1)/P D b (rho = 1 for a vanilla MoE).

    Holds for any P once FFN load is even over ranks: a slot stays home with probability 1/P."""
    P = world_size
    return top_k * ffn_share * (P - 1) / P * d_model * bytes_per_element


def dedup_bytes_per_token_at_balance(top_k: int, ffn_share: float, n_ffn: int, world_size: int, d_model: int,
                                     bytes_per_element: int) -> float | None:
    """Expected one-way bytes per token for the dedup dispatcher, if each of the K slots is an FFN slot
    independently with probability rho and a token's FFN experts are distinct and uniform.

    With G = E/P experts per rank, a remote rank receives a token with k FFN experts unless all k avoid its G
    experts: probability C(E-G, k) / C(E, k). When P >= E every expert has a rank of its own and nothing
    deduplicates. None when P < E and P does not divide E (the layer cannot be sharded that way)."""
    P, E, K = world_size, n_ffn, top_k
    if P < E and E % P:
        return None
    rows = 0.0
    for k in range(K + 1):
        p_k = comb(K, k) * ffn_share**k * (1 - ffn_share) ** (K - k)
        if P >= E:
            rows += p_k * k * (P - 1) / P
        else:
            G = E // P
            rows += p_k * (P - 1) * (1 - comb(E - G, k) / comb(E, k))
    return rows * d_model * bytes_per_element
