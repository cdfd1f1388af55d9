"""Routing statistics of a checkpoint over a token stream, accumulated batch by batch in bounded memory.

Every statistic counts real tokens only (the model routes padding too). What is kept between batches is fixed
in size: expert loads, histograms with fixed bins, sums for means, variances and correlations, co-activation
counts and per-vocabulary-entry accumulators. Nothing per token survives a batch; the optional per-token
sinks (trace, routing ids) stream to files.

"Routing score" is the router's softmax over all N experts, after the checkpoint's logits normalisation when
it uses one: the quantity the top-k chooses on, and the one the paper's Figure 6 plots (top-1 and top-2).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from moepp.config import EXPERT_TYPES, MoEConfig
from moepp.layer import RoutingRecord
from moepp.router import normalise_logits

from .imbalance import imbalance, maxvio_against
from .token_input import Batch, TokenInputs

SCORE_BINS = 100  # fixed bins of width 0.01 over [0, 1]
SCORE_RANKS = ("top1", "top2")


@dataclass(frozen=True)
class RoutingLayout:
    """What the statistics need to know about the checkpoint's MoE layers."""

    n_layers: int  # MoE layers
    n_experts: int
    top_k: int
    n_ffn: int
    expert_types: tuple[str, ...]
    tau: float
    tau_known: bool
    rho: float
    capacity: bool

    @classmethod
    def from_model(cls, model) -> "RoutingLayout":
        m: MoEConfig = model.cfg.moe
        info = getattr(model, "checkpoint_info", None)
        return cls(n_layers=len(model.moe_layers), n_experts=m.n_experts, top_k=m.top_k, n_ffn=m.n_ffn,
                   expert_types=m.expert_types, tau=m.tau, tau_known=True if info is None else info.tau_known,
                   rho=m.rho, capacity=m.capacity_factor is not None)

    @property
    def k_rho(self) -> float:
        return self.top_k * self.rho


class RoutingAccumulator:
    """Fixed-size running totals of everything routing-stats reports; update() once per batch."""

    def __init__(self, cfg: MoEConfig, n_layers: int, n_tasks: int, vocab_size: int):
        N, K, L, X = cfg.n_experts, cfg.top_k, n_layers, n_tasks
        self.cfg, self.L, self.N, self.K, self.X = cfg, L, N, K, X
        long = dict(dtype=torch.long)
        self.type_N = torch.tensor([EXPERT_TYPES.index(t) for t in cfg.expert_types], **long)
        self.tokens_X = torch.zeros(X, **long)
        self.load_LN = torch.zeros(L, N, **long)  # slots the router chose
        self.kept_LN = torch.zeros(L, N, **long)  # of those, slots not dropped by capacity
        self.ffn_hist_XLJ = torch.zeros(X, L, K + 1, **long)  # tokens with j FFN experts, per task and layer
        self.type_slots_XLY = torch.zeros(X, L, len(EXPERT_TYPES), **long)
        self.coact_LNN = torch.zeros(L, N, N, **long)  # unordered pairs chosen together, stored at [min, max]
        self.score_hist_LRB = torch.zeros(L, 2, SCORE_BINS, **long)
        self.score_sum_LR = torch.zeros(L, 2, dtype=torch.float64)
        self.score_sumsq_LR = torch.zeros(L, 2, dtype=torch.float64)
        self.score_min_LR = torch.full((L, 2), math.inf, dtype=torch.float64)
        self.score_max_LR = torch.full((L, 2), -math.inf, dtype=torch.float64)
        self.ffn_sum_L = torch.zeros(L, **long)  # sums over tokens of FFN experts per token, for correlations
        self.ffn_sumsq_L = torch.zeros(L, **long)
        self.ffn_cross_L = torch.zeros(max(L - 1, 0), **long)  # layer l times layer l+1
        self.token_count_V = torch.zeros(vocab_size, **long)
        self.token_ffn_V = torch.zeros(vocab_size, **long)  # FFN experts summed over layers and occurrences

    @property
    def n_tokens(self) -> int:
        return int(self.tokens_X.sum())

    def update(self, records: list[RoutingRecord], valid_T: torch.Tensor, token_ids_T: torch.Tensor,
               task_T: torch.Tensor) -> None:
        """records: one per MoE layer for the batch's B*S positions; valid_T marks real tokens."""
        N, K, X = self.N, self.K, self.X
        valid_T = valid_T.cpu()
        tok_R, task_R = token_ids_T[valid_T], task_T[valid_T]
        self.tokens_X += torch.bincount(task_R, minlength=X)
        self.token_count_V.index_add_(0, tok_R, torch.ones_like(tok_R))
        prev_ffn_R = None
        for l, rec in enumerate(records):
            ids_RK = rec.topk_ids.cpu()[valid_T]
            dropped_RK = rec.dropped.cpu()[valid_T]
            self.load_LN[l] += torch.bincount(ids_RK.reshape(-1), minlength=N)
            self.kept_LN[l] += torch.bincount(ids_RK[~dropped_RK], minlength=N)
            ffn_R = (ids_RK < self.cfg.n_ffn).sum(1)
            self.ffn_hist_XLJ[:, l] += torch.bincount(task_R * (K + 1) + ffn_R, minlength=X * (K + 1)).view(X, K + 1)
            types_RK = self.type_N[ids_RK]
            n_types = len(EXPERT_TYPES)
            self.type_slots_XLY[:, l] += torch.bincount((task_R.unsqueeze(1) * n_types + types_RK).reshape(-1),
                                                        minlength=X * n_types).view(X, n_types)
            for a in range(K):
                for b in range(a + 1, K):
                    lo, hi = torch.minimum(ids_RK[:, a], ids_RK[:, b]), torch.maximum(ids_RK[:, a], ids_RK[:, b])
                    self.coact_LNN[l] += torch.bincount(lo * N + hi, minlength=N * N).view(N, N)
            self._scores(l, rec.logits.cpu()[valid_T])
            self.ffn_sum_L[l] += ffn_R.sum()
            self.ffn_sumsq_L[l] += ffn_R.square().sum()
            if prev_ffn_R is not None:
                self.ffn_cross_L[l - 1] += (prev_ffn_R * ffn_R).sum()
            prev_ffn_R = ffn_R
            self.token_ffn_V.index_add_(0, tok_R, ffn_R)

    def _scores(self, l: int, logits_RN: torch.Tensor) -> None:
        if logits_RN.shape[0] == 0:
            return
        probs_RN = torch.softmax(normalise_logits(logits_RN.float(), self.cfg), dim=1)
        top_R2 = probs_RN.topk(min(2, self.N), dim=1).values.double()
        for r in range(top_R2.shape[1]):
            p_R = top_R2[:, r]
            bins_R = (p_R * SCORE_BINS).long().clamp_(0, SCORE_BINS - 1)
            self.score_hist_LRB[l, r] += torch.bincount(bins_R, minlength=SCORE_BINS)
            self.score_sum_LR[l, r] += p_R.sum()
            self.score_sumsq_LR[l, r] += p_R.square().sum()
            self.score_min_LR[l, r] = min(self.score_min_LR[l, r].item(), p_R.min().item())
            self.score_max_LR[l, r] = max(self.score_max_LR[l, r].item(), p_R.max().item())


@dataclass
class RoutingRun:
    """The result of one pass: the accumulators plus what produced them."""

    layout: RoutingLayout
    tasks: list  # TaskInput
    stats: RoutingAccumulator
    ablated: RoutingAccumulator | None  # the same inputs with the gating residual switched off
    seconds: float
    extra: dict = field(default_factory=dict)


BatchSink = Callable[[Batch, list[RoutingRecord]], None]


def collect_routing_stats(model, inputs: TokenInputs, *, ablate_gating_residual: bool = False,
                          sinks: tuple[BatchSink, ...] = (), on_tokens: Callable[[int], None] | None = None,
                          device: str = "cpu") -> RoutingRun:
    """Route every input token through the model and accumulate the statistics.

    sinks get (batch, routing records) for each batch of the main pass (for the trace and the routing file);
    on_tokens(n) reports progress in real tokens (the ablated pass counts too, so the total doubles)."""
    layout = RoutingLayout.from_model(model)
    cfg, L, V = model.cfg.moe, layout.n_layers, model.cfg.vocab_size
    stats = RoutingAccumulator(cfg, L, len(inputs.tasks), V)
    ablated = RoutingAccumulator(cfg, L, len(inputs.tasks), V) if ablate_gating_residual else None
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in inputs.batches():
            ids_BS = batch.input_ids_BS.to(device)
            # Without padding the plain causal mask is the same attention and takes the fast kernel.
            mask_BS = None if bool(batch.mask_BS.all()) else batch.mask_BS.to(device)
            valid_T = batch.mask_BS.reshape(-1)
            task_T = batch.task_B.repeat_interleave(batch.input_ids_BS.shape[1])
            token_T = batch.input_ids_BS.reshape(-1)
            passes = [(stats, True)] + ([(ablated, False)] if ablated is not None else [])
            for acc, residual in passes:
                out = model(ids_BS, attention_mask=mask_BS, return_routing=True, gating_residual=residual,
                            return_logits=False)  # routing never depends on the LM head
                acc.update(out.routing, valid_T, token_T, task_T)
                if residual:
                    for sink in sinks:
                        sink(batch, out.routing)
                del out
                if on_tokens:
                    on_tokens(batch.n_tokens)
    return RoutingRun(layout, list(inputs.tasks), stats, ablated, time.perf_counter() - start)


# Tables ----------------------------------------------------------------------------------------------------
def _div(a: float, b: float) -> float:
    return a / b if b else math.nan


def expert_load_rows(run: RoutingRun) -> list[dict]:
    s, lay = run.stats, run.layout
    slots = s.n_tokens * lay.top_k
    rows = []
    for l in range(lay.n_layers):
        for e in range(lay.n_experts):
            routed, kept = int(s.load_LN[l, e]), int(s.kept_LN[l, e])
            rows.append({"layer": l, "expert": e, "expert_type": lay.expert_types[e], "tokens": routed,
                         "share": _div(routed, slots), "kept": kept, "dropped": routed - kept})
    return rows


def _ffn_row(task: str, layer, hist_J: torch.Tensor, types_Y: torch.Tensor, lay: RoutingLayout) -> dict:
    tokens = int(hist_J.sum())
    slots = int(types_Y.sum())
    row = {"task": task, "layer": layer, "tokens": tokens}
    row.update({f"ffn_{j}": int(hist_J[j]) for j in range(lay.top_k + 1)})
    mean = _div(float((hist_J * torch.arange(lay.top_k + 1)).sum()), tokens)
    row.update({"mean_ffn_experts": mean, "k_rho": lay.k_rho if lay.tau_known else None,
                "k_rho_assumed_tau": None if lay.tau_known else lay.k_rho})
    row.update({f"share_{t}": _div(int(types_Y[y]), slots) for y, t in enumerate(EXPERT_TYPES)})
    return row


def ffn_per_token_rows(run: RoutingRun, acc: RoutingAccumulator | None = None) -> list[dict]:
    """Per layer and over all layers ('all'), for all tasks together ('all') and each task: the histogram of
    FFN experts per token (ffn_0 .. ffn_K), its mean beside K*rho, and the share of slots per expert type."""
    s, lay = acc or run.stats, run.layout
    names = ["all"] + ([t.name for t in run.tasks] if len(run.tasks) > 1 else [])
    rows = []
    for name in names:
        if name == "all":
            hist_LJ, types_LY = s.ffn_hist_XLJ.sum(0), s.type_slots_XLY.sum(0)
        else:
            x = [t.name for t in run.tasks].index(name)
            hist_LJ, types_LY = s.ffn_hist_XLJ[x], s.type_slots_XLY[x]
        for l in range(lay.n_layers):
            rows.append(_ffn_row(name, l, hist_LJ[l], types_LY[l], lay))
        rows.append(_ffn_row(name, "all", hist_LJ.sum(0), types_LY.sum(0), lay))
    return rows


def token_rows(run: RoutingRun, token_string: Callable[[int], str]) -> list[dict]:
    """Every vocabulary entry seen: occurrences and mean FFN experts per layer, highest mean first."""
    s, L = run.stats, run.layout.n_layers
    seen = torch.nonzero(s.token_count_V).flatten()
    rows = []
    for v in seen.tolist():
        count = int(s.token_count_V[v])
        rows.append({"token_id": v, "token": token_string(v), "occurrences": count,
                     "mean_ffn_experts": int(s.token_ffn_V[v]) / (count * L)})
    rows.sort(key=lambda r: (-r["mean_ffn_experts"], -r["occurrences"], r["token_id"]))
    return rows


def extreme_tokens(rows: list[dict], min_count: int, n: int) -> tuple[list[dict], list[dict]]:
    """The n tokens with the highest and the n with the lowest mean, among those seen at least min_count times."""
    frequent = [r for r in rows if r["occurrences"] >= min_count]
    lowest = sorted(frequent, key=lambda r: (r["mean_ffn_experts"], -r["occurrences"], r["token_id"]))[:n]
    return frequent[:n], lowest


def score_hist_rows(acc: RoutingAccumulator, residual: str) -> list[dict]:
    rows = []
    for l in range(acc.L):
        for r, rank in enumerate(SCORE_RANKS[: min(2, acc.N)]):
            for b in range(SCORE_BINS):
                rows.append({"gating_residual": residual, "layer": l, "rank": rank, "bin_lo": b / SCORE_BINS,
                             "bin_hi": (b + 1) / SCORE_BINS, "tokens": int(acc.score_hist_LRB[l, r, b])})
    return rows


def score_summary_rows(acc: RoutingAccumulator, residual: str) -> list[dict]:
    rows, n = [], acc.n_tokens
    for l in range(acc.L):
        for r, rank in enumerate(SCORE_RANKS[: min(2, acc.N)]):
            mean = _div(float(acc.score_sum_LR[l, r]), n)
            var = _div(float(acc.score_sumsq_LR[l, r]), n) - mean**2 if n else math.nan
            rows.append({"gating_residual": residual, "layer": l, "rank": rank, "tokens": n, "mean": mean,
                         "variance": max(var, 0.0) if n else math.nan,
                         "min": float(acc.score_min_LR[l, r]) if n else math.nan,
                         "max": float(acc.score_max_LR[l, r]) if n else math.nan})
    return rows


def imbalance_rows(run: RoutingRun) -> list[dict]:
    """Per layer, for the FFN experts alone and for all experts: the metrics of imbalance.py on the routed
    loads, the drop rate (capacity), and for all experts MaxVio against the tau-weighted target load."""
    s, lay = run.stats, run.layout
    target_N = [lay.tau if t == "ffn" else 1.0 for t in lay.expert_types]
    rows = []
    for l in range(lay.n_layers):
        routed, kept = s.load_LN[l], s.kept_LN[l]
        slots = int(routed.sum())
        drop = _div(slots - int(kept.sum()), slots)
        for group, n in (("ffn", lay.n_ffn), ("all", lay.n_experts)):
            sel = slice(0, n)  # FFN experts come first
            row = {"layer": l, "experts": group, "n_experts": n, "slots": int(routed[sel].sum())}
            row.update(imbalance(routed[sel]))
            row["maxvio_vs_tau_target"] = maxvio_against(routed, target_N) if group == "all" else None
            row["drop_rate"] = drop if lay.capacity else None
            rows.append(row)
    return rows


def coactivation_rows(run: RoutingRun) -> list[dict]:
    """Every unordered pair of distinct experts per layer: tokens that chose both, their share of all tokens,
    and the conditional shares P(b | a) (of the tokens that chose a, the share that also chose b) and P(a | b)."""
    s, lay = run.stats, run.layout
    T = s.n_tokens
    rows = []
    for l in range(lay.n_layers):
        for a in range(lay.n_experts):
            for b in range(a + 1, lay.n_experts):
                pairs = int(s.coact_LNN[l, a, b])
                rows.append({"layer": l, "expert_a": a, "expert_b": b, "type_a": lay.expert_types[a],
                             "type_b": lay.expert_types[b], "tokens": pairs, "share": _div(pairs, T),
                             "p_b_given_a": _div(pairs, int(s.load_LN[l, a])),
                             "p_a_given_b": _div(pairs, int(s.load_LN[l, b]))})
    return rows


def layer_correlation_rows(run: RoutingRun) -> list[dict]:
    """Pearson correlation over tokens of the FFN experts a token gets in layer l and in layer l+1."""
    s, n = run.stats, run.stats.n_tokens
    rows = []
    for l in range(run.layout.n_layers - 1):
        ma, mb = _div(int(s.ffn_sum_L[l]), n), _div(int(s.ffn_sum_L[l + 1]), n)
        va = _div(int(s.ffn_sumsq_L[l]), n) - ma * ma
        vb = _div(int(s.ffn_sumsq_L[l + 1]), n) - mb * mb
        cov = _div(int(s.ffn_cross_L[l]), n) - ma * mb
        r = cov / math.sqrt(va * vb) if n and va > 1e-12 and vb > 1e-12 else math.nan
        rows.append({"layer_a": l, "layer_b": l + 1, "tokens": n, "mean_a": ma, "mean_b": mb, "pearson_r": r})
    return rows


def layer_summary_rows(run: RoutingRun) -> list[dict]:
    """One row per MoE layer with the headline numbers (the summary JSON's rows and the console table)."""
    lay = run.layout
    ffn = {r["layer"]: r for r in ffn_per_token_rows(run) if r["task"] == "all"}
    ffn_ablated = ({r["layer"]: r for r in ffn_per_token_rows(run, run.ablated) if r["task"] == "all"}
                   if run.ablated is not None else {})
    imb = {(r["layer"], r["experts"]): r for r in imbalance_rows(run)}
    scores = {(r["layer"], r["rank"]): r for r in score_summary_rows(run.stats, "on")}
    scores_off = ({(r["layer"], r["rank"]): r for r in score_summary_rows(run.ablated, "off")}
                  if run.ablated is not None else {})
    corr = {r["layer_a"]: r["pearson_r"] for r in layer_correlation_rows(run)}
    rows = []
    for l in range(lay.n_layers):
        f = ffn[l]
        row = {"layer": l, "tokens": f["tokens"], "mean_ffn_experts": f["mean_ffn_experts"], "k_rho": f["k_rho"]}
        row.update({k: f[k] for k in f if k.startswith("share_")})
        row.update({"cv_ffn": imb[(l, "ffn")]["cv"], "maxvio_ffn": imb[(l, "ffn")]["maxvio"],
                    "gini_all": imb[(l, "all")]["gini"], "drop_rate": imb[(l, "all")]["drop_rate"],
                    "corr_next_layer": corr.get(l)})
        for rank in SCORE_RANKS[: min(2, lay.n_experts)]:
            row[f"{rank}_score_mean"] = scores[(l, rank)]["mean"]
            row[f"{rank}_score_var"] = scores[(l, rank)]["variance"]
            if scores_off:
                row[f"{rank}_score_mean_no_residual"] = scores_off[(l, rank)]["mean"]
                row[f"{rank}_score_var_no_residual"] = scores_off[(l, rank)]["variance"]
        if ffn_ablated:
            row["mean_ffn_experts_no_residual"] = ffn_ablated[l]["mean_ffn_experts"]
        rows.append(row)
    return rows
