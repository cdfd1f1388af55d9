"""FLOPs, bytes and activated parameters of one MoE(++) layer, per component, analytic and counted.

Analytic: from the config and the realised routing, modelling what the chosen dispatch backend runs.
Counted: torch.utils.flop_counter.FlopCounterMode on the real layer (router forward, then
moepp.dispatch.dispatch_combine with the same routing injected), attributed to components (below).

FLOPs are matmul FLOPs (2 per multiply-add), the convention of FlopCounterMode and of the paper's complexity
table; element-wise work (SwiGLU activation, softmax, gating) is not counted. Backward matmul FLOPs are twice
the forward: every matmul here has both operands requiring grad, so it needs one matmul for each gradient.

Components: router (logits, plus the N x N gating-residual map when the layer has a previous MoE layer),
ffn_experts, constant_experts, copy_experts, zero_experts (zero experts and capacity-dropped slots).
What runs, by backend (the analytic model follows it exactly):
  sorted, padded  FFN rows through per-expert mm (padded: bmm over [n_ffn, max_count] rows, padding included);
                  zc.add_token_terms gathers only the constant rows, computes [a1, a2] of every constant
                  expert for them (2*D*2C FLOPs per constant row), folds the gates into per-token
                  coefficients and adds them in two passes over [T, D]: y += cv_TC @ v (2*T*C*D FLOPs) and
                  y += cx_T * x; copy slots cost only that shared pass, zero slots nothing.
  grouped_mm      every slot (zero slots too) is gathered, goes through zc.rows ([a1, a2] of every constant
                  expert for every slot, FFN slots included) and is combined; FFN rows
                  through torch._grouped_mm (a FLOP formula is registered below: FlopCounterMode counts 0
                  for it otherwise).
  loop            per expert: gather, expert, index_add; constant expert c computes only its own [a1, a2]
                  (2*D*2 per row); zero slots are gathered and combined (as zeros), as in the official code.

Bytes (analytic, b = bytes per element, indices int64):
  weight_bytes   weights read once per pass (router in float32); backward reads them and writes their grads.
  gather_bytes   dispatch gather per row: read D*b, write D*b, read an index; backward is an index_add of the
                 row gradients: 3*D*b + 8 per row.
  combine_bytes  scale by the gate (read D*b and the gate, write D*b), index_add (read the row, read and write
                 the output row, read an index): 5*D*b + b + 8 per row; the backward is counted the same.
                 sorted/padded constant and copy experts: the [T, D] passes instead (cv @ v: 2*T*D*b + T*C*b;
                 cx * x: 3*T*D*b, split between constant and copy in proportion to their slots).
Activated parameters per token: router parameters, plus (FFN slots / T) * 3*D*H and (constant slots / T) * 3*D.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

from moepp.config import MoEConfig
from moepp.dispatch import dispatch_combine, make_plan
from moepp.layer import MoELayer

from .memory import dtype_bytes
from .params import moe_layer_params
from .routing_gen import ffn_slot_fraction

COMPONENTS = ("router", "ffn_experts", "constant_experts", "copy_experts", "zero_experts")
PASSES = ("forward", "backward")
INDEX_BYTES = 8
_TAG = "moepp_bench_component"


# torch._grouped_mm FLOPs -----------------------------------------------------------------------------------
def _grouped_mm_flop(a, b, offs=None, bias=None, out_dtype=None, *args, out_val=None, **kwargs) -> int:
    """FLOPs of torch._grouped_mm. With offs, only the rows (or columns, or inner elements) up to offs[-1]
    are computed, so this needs the real offs tensor (get_raw=True), not just shapes."""

    def grouped(full: int) -> int:
        return int(offs[-1].item()) if offs is not None and offs.numel() else full

    if a.dim() == 2 and b.dim() == 3:  # rows of a split into groups, one weight per group
        return 2 * grouped(a.shape[0]) * a.shape[1] * b.shape[2]
    if a.dim() == 2 and b.dim() == 2:  # the inner dimension split into groups (weight gradients)
        return 2 * a.shape[0] * grouped(a.shape[1]) * b.shape[1]
    if a.dim() == 3 and b.dim() == 2:  # columns of b split into groups
        return 2 * a.shape[1] * a.shape[2] * grouped(b.shape[1])
    return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]  # batched, no offsets


if torch.ops.aten._grouped_mm not in flop_registry:
    register_flop_formula(torch.ops.aten._grouped_mm, get_raw=True)(_grouped_mm_flop)


# Routing summary -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlotCounts:
    """Kept routing slots per expert (dispatch's own plan, so capacity drops are applied) and dropped slots."""

    n_tokens: int
    per_expert: tuple[int, ...]
    dropped: int

    @classmethod
    def from_routing(cls, topk_ids_TK: torch.Tensor, cfg: MoEConfig) -> "SlotCounts":
        counts = make_plan(topk_ids_TK, cfg).counts_N1.tolist()
        return cls(topk_ids_TK.shape[0], tuple(counts[:-1]), counts[-1])

    def of(self, cfg: MoEConfig, kind: str) -> int:
        return sum(self.per_expert[i] for i in cfg.type_range(kind))

    def by_component(self, cfg: MoEConfig) -> dict[str, int]:
        return {"router": self.n_tokens, "ffn_experts": self.of(cfg, "ffn"),
                "constant_experts": self.of(cfg, "constant"), "copy_experts": self.of(cfg, "copy"),
                "zero_experts": self.of(cfg, "zero") + self.dropped}


@dataclass
class ComponentCost:
    slots: int = 0  # routing slots handled (router: tokens)
    flops: int = 0
    weight_bytes: int = 0
    gather_bytes: int = 0
    combine_bytes: int = 0
    params_per_token: float = 0.0

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.gather_bytes + self.combine_bytes


def router_flops(cfg: MoEConfig, n_tokens: int, residual: bool) -> int:
    N, D = cfg.n_experts, cfg.d_model
    per_token = 2 * D * N if cfg.router == "linear" else 2 * D * cfg.router_mult * N + 2 * cfg.router_mult * N * N
    return n_tokens * (per_token + (2 * N * N if residual else 0))


def analytic_layer_costs(cfg: MoEConfig, slots: SlotCounts, *, residual: bool, backend: str,
                         dtype: torch.dtype | str, backward: bool) -> dict[tuple[str, str], ComponentCost]:
    """{(pass, component): ComponentCost} for one layer, following what `backend` runs (see the module doc)."""
    T, D, H, C = slots.n_tokens, cfg.d_model, cfg.d_expert, cfg.n_constant
    b = dtype_bytes(dtype)
    by_comp = slots.by_component(cfg)
    params = moe_layer_params(cfg)
    per_expert = slots.per_expert

    fwd = {c: ComponentCost(slots=by_comp[c]) for c in COMPONENTS}
    router_params = params["router"] + (params["gate_map"] if residual else 0)
    fwd["router"].flops = router_flops(cfg, T, residual)
    fwd["router"].weight_bytes = router_params * 4  # the router runs in float32
    fwd["router"].params_per_token = float(router_params)

    ffn_counts = [per_expert[i] for i in cfg.type_range("ffn")]
    r_ffn = sum(ffn_counts)
    if backend == "padded":
        ffn_rows_computed = cfg.n_ffn * max(ffn_counts) if r_ffn else 0
        ffn_weights_read = cfg.n_ffn if r_ffn else 0
    else:
        ffn_rows_computed = r_ffn
        ffn_weights_read = sum(1 for n in ffn_counts if n)
    fwd["ffn_experts"].flops = ffn_rows_computed * 6 * D * H
    fwd["ffn_experts"].weight_bytes = ffn_weights_read * 3 * D * H * b
    fwd["ffn_experts"].params_per_token = r_ffn / T * 3 * D * H
    fwd["constant_experts"].params_per_token = by_comp["constant_experts"] / T * 3 * D

    row_gather = 2 * D * b + INDEX_BYTES  # read a row, write it, read its index
    row_combine = 5 * D * b + b + INDEX_BYTES  # scale by the gate, index_add into the output row
    r_const, r_copy = by_comp["constant_experts"], by_comp["copy_experts"]
    const, copy = fwd["constant_experts"], fwd["copy_experts"]
    fwd["ffn_experts"].gather_bytes = r_ffn * row_gather
    fwd["ffn_experts"].combine_bytes = r_ffn * row_combine
    if backend in ("sorted", "padded"):
        # zc.add_token_terms: W_c only on constant rows, then per-token scalars folded into two passes over
        # [T, D]: y += cv_TC @ v (constant experts) and y += cx_T * x (constant and copy experts).
        if r_const:
            const.flops = r_const * 2 * D * 2 * C + 2 * T * C * D
            const.gather_bytes = r_const * row_gather
            const.combine_bytes = 2 * T * D * b + T * C * b
            const.weight_bytes = 3 * C * D * b
        if r_const + r_copy:
            shared = 3 * T * D * b  # read y and x, write y; split by slots between constant and copy
            const.combine_bytes += shared * r_const // (r_const + r_copy)
            copy.combine_bytes += shared - shared * r_const // (r_const + r_copy)
    elif backend == "grouped_mm":
        # Every slot is gathered, goes through zc.rows ([a1, a2] of every constant expert) and is combined;
        # FFN rows too, whose zc.rows result the mask then discards.
        for comp in COMPONENTS[1:]:
            rows = by_comp[comp]
            fwd[comp].flops += rows * 2 * D * 2 * C
            if comp != "ffn_experts":
                fwd[comp].gather_bytes = rows * row_gather
                fwd[comp].combine_bytes = rows * row_combine
        const.weight_bytes = 3 * C * D * b
    else:  # loop: per expert a gather, the expert, an index_add; constant expert c computes only its own a
        for comp in COMPONENTS[2:]:
            rows = by_comp[comp] - (slots.dropped if comp == "zero_experts" else 0)
            fwd[comp].gather_bytes = rows * row_gather
            fwd[comp].combine_bytes = rows * row_combine
        const.flops = r_const * 2 * D * 2
        const.weight_bytes = sum(1 for i in cfg.type_range("constant") if per_expert[i]) * 3 * D * b

    costs = {("forward", c): cost for c, cost in fwd.items()}
    if backward:
        for c, f in fwd.items():
            # Matmuls: one per operand gradient. Traffic: the gather's backward is an index_add of the row
            # gradients (3 row passes instead of 2); the combine's is counted as its forward.
            costs[("backward", c)] = ComponentCost(
                slots=f.slots, flops=2 * f.flops, weight_bytes=2 * f.weight_bytes,
                gather_bytes=f.gather_bytes // row_gather * (3 * D * b + INDEX_BYTES),
                combine_bytes=f.combine_bytes, params_per_token=f.params_per_token)
    return costs


# Counting with FlopCounterMode -----------------------------------------------------------------------------
class ComponentFlopCounter(FlopCounterMode):
    """FlopCounterMode that also attributes every counted op to a (pass, component).

    Forward: the component is the one set by `section`. Backward: the autograd node being run carries the
    component in its metadata when `tag_graph` marked it (zero-computation expert rows), otherwise the section's.
    The totals stay FlopCounterMode's own ("Global"), so attribution can never change what is counted.
    """

    def __init__(self):
        super().__init__(display=False)
        self.by_component: dict[tuple[str, str], int] = defaultdict(int)
        self._phase, self._component = "forward", "ffn_experts"

    @contextlib.contextmanager
    def section(self, phase: str, component: str):
        saved = self._phase, self._component
        self._phase, self._component = phase, component
        try:
            yield
        finally:
            self._phase, self._component = saved

    def _count_flops(self, func_packet, out, args, kwargs):
        before = self.flop_counts["Global"].get(func_packet, 0)
        result = super()._count_flops(func_packet, out, args, kwargs)
        delta = self.flop_counts["Global"].get(func_packet, 0) - before
        if delta:
            component = self._component
            if self._phase == "backward":
                node = torch._C._current_autograd_node()
                if node is not None:
                    component = node.metadata.get(_TAG, component)
            self.by_component[(self._phase, component)] += delta
        return result


def tag_graph(output: torch.Tensor, inputs: list[torch.Tensor], component: str) -> None:
    """Mark the autograd nodes between `inputs` (exclusive) and `output` as belonging to `component`."""
    if output.grad_fn is None:
        return
    stop_nodes = [t.grad_fn for t in inputs if t.grad_fn is not None]
    pending, seen = [output.grad_fn], set()
    while pending:
        node = pending.pop()
        if node is None or id(node) in seen or any(node is stop for stop in stop_nodes):
            continue
        seen.add(id(node))
        node.metadata[_TAG] = component
        pending.extend(next_node for next_node, _ in node.next_functions)


class _ZeroComputationProbe:
    """Stands in for the layer's ZeroComputationExperts inside dispatch_combine: runs the same code on the
    same rows, one expert kind at a time, so the counter can tell constant, copy and zero rows apart."""

    def __init__(self, zc, cfg: MoEConfig, counter: ComponentFlopCounter):
        self.zc, self.counter = zc, counter
        kinds = [f"{kind}_experts" for kind in cfg.expert_types] + ["zero_experts"]  # id N: a dropped slot
        self.kind_N1 = torch.tensor([COMPONENTS.index(k) for k in kinds])

    def rows(self, x_RD: torch.Tensor, expert_R: torch.Tensor) -> torch.Tensor:
        kind_R = self.kind_N1.to(expert_R.device)[expert_R]
        parts, order = [], []
        for k in kind_R.unique().tolist():
            idx_R = torch.nonzero(kind_R == k).squeeze(1)
            x_part = x_RD.index_select(0, idx_R)
            with self.counter.section("forward", COMPONENTS[k]):
                out = self.zc.rows(x_part, expert_R.index_select(0, idx_R))
            if out.requires_grad:
                tag_graph(out, [x_part], COMPONENTS[k])
            parts.append(out)
            order.append(idx_R)
        if not parts:
            return x_RD.new_zeros(x_RD.shape)
        perm_R = torch.cat(order)
        inverse_R = torch.empty_like(perm_R)
        inverse_R[perm_R] = torch.arange(perm_R.numel(), device=perm_R.device)
        return torch.cat(parts).index_select(0, inverse_R)

    def __getattr__(self, name: str):
        """Any other method (constant_expert, add_token_terms, ...): only constant experts have weights, so
        every matmul in zero-computation code outside `rows` is a constant expert's."""
        method = getattr(self.zc, name)
        if not callable(method):
            return method

        def counted(*args, **kwargs):
            with self.counter.section("forward", "constant_experts"):
                out = method(*args, **kwargs)
            if isinstance(out, torch.Tensor) and out.requires_grad:
                inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
                tag_graph(out, inputs, "constant_experts")
            return out

        return counted


def counted_layer_flops(layer: MoELayer, cfg: MoEConfig, topk_ids_TK: torch.Tensor, gates_TK: torch.Tensor, *,
                        prev_logits_TN: torch.Tensor | None, backend: str, backward: bool,
                        seed: int = 0) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
    """Run the router and dispatch_combine of `layer` with the given routing under FlopCounterMode.

    Returns ({(pass, component): FLOPs}, {pass: FlopCounterMode's total}). Activations are random: FLOPs do not
    depend on their values. prev_logits_TN: the previous layer's logits for the gating residual, or None.
    """
    device, dtype = layer.ffn.w_up.device, layer.ffn.w_up.dtype
    gen = torch.Generator().manual_seed(seed)
    T = topk_ids_TK.shape[0]
    x_TD = torch.randn(T, cfg.d_model, generator=gen).to(device, dtype).requires_grad_(backward)
    prev = None
    if prev_logits_TN is not None:
        prev = prev_logits_TN.detach().float().to(device).requires_grad_(backward)
    counter = ComponentFlopCounter()
    probe = _ZeroComputationProbe(layer.zc, cfg, counter)
    totals = {}
    grad_mode = contextlib.nullcontext() if backward else torch.no_grad()
    with grad_mode, counter:
        with counter.section("forward", "router"):
            logits_TN = layer.router(x_TD, prev)
        with counter.section("forward", "ffn_experts"):
            y_TD, _ = dispatch_combine(x_TD, topk_ids_TK, gates_TK, layer.ffn, probe, cfg, backend)
        totals["forward"] = sum(counter.flop_counts["Global"].values())
        if backward:
            with counter.section("backward", "router"):
                logits_TN.backward(torch.randn(logits_TN.shape, generator=gen).to(logits_TN))
            with counter.section("backward", "ffn_experts"):
                y_TD.backward(torch.randn(y_TD.shape, generator=gen).to(y_TD))
            totals["backward"] = sum(counter.flop_counts["Global"].values()) - totals["forward"]
    for p in layer.parameters():
        p.grad = None
    return dict(counter.by_component), totals


# Rows ------------------------------------------------------------------------------------------------------
@dataclass
class LayerFlops:
    """Everything counted for one (model, layer, routing) setting; `rows()` flattens it for result files."""

    labels: dict  # model, preset, layer, tau, tokens, dtype, backend, routing, input, ...
    costs: dict[tuple[str, str], ComponentCost]
    counted: dict[tuple[str, str], int] | None
    counted_totals: dict[str, int] | None
    ffn_slot_fraction: float
    rho: float

    def ffn_flops(self, phase: str) -> int:
        return self.costs[(phase, "ffn_experts")].flops

    def rows(self, vanilla_ffn_flops: dict[str, int] | None) -> list[dict]:
        out = []
        for phase in PASSES:
            if (phase, "router") not in self.costs:
                continue
            ratio = None
            if vanilla_ffn_flops and vanilla_ffn_flops.get(phase):
                ratio = self.ffn_flops(phase) / vanilla_ffn_flops[phase]
            common = {**self.labels, "pass": phase, "ffn_slot_fraction": self.ffn_slot_fraction, "rho": self.rho,
                      "ffn_flops_ratio_vs_vanilla": ratio}
            total = ComponentCost()
            for comp in COMPONENTS:
                cost = self.costs[(phase, comp)]
                counted = None if self.counted is None else self.counted.get((phase, comp), 0)
                out.append({**common, "component": comp, **_cost_columns(cost, counted)})
                total.flops += cost.flops
                total.weight_bytes += cost.weight_bytes
                total.gather_bytes += cost.gather_bytes
                total.combine_bytes += cost.combine_bytes
                total.params_per_token += cost.params_per_token
                if comp != "router":
                    total.slots += cost.slots  # all K*T routing slots
            counted_total = None if self.counted_totals is None else self.counted_totals.get(phase)
            out.append({**common, "component": "total", **_cost_columns(total, counted_total)})
        return out


def _cost_columns(cost: ComponentCost, counted: int | None) -> dict:
    if counted is None:
        rel = None
    elif cost.flops == 0:
        rel = 0.0 if counted == 0 else float("inf")
    else:
        rel = (counted - cost.flops) / cost.flops
    return {"slots": cost.slots, "flops": cost.flops, "counted_flops": counted, "flops_rel_diff": rel,
            "weight_bytes": cost.weight_bytes, "gather_bytes": cost.gather_bytes,
            "combine_bytes": cost.combine_bytes, "bytes": cost.bytes,
            "activated_params_per_token": cost.params_per_token}


def measure_layer_flops(layer: MoELayer | None, cfg: MoEConfig, topk_ids_TK: torch.Tensor, gates_TK: torch.Tensor,
                        *, labels: dict, prev_logits_TN: torch.Tensor | None, residual: bool, backend: str,
                        dtype: torch.dtype, backward: bool, seed: int = 0) -> LayerFlops:
    """Analytic costs of one layer with this routing and, when `layer` is given, FlopCounterMode's count of
    the same computation. `residual`: whether the layer adds the gating residual (prev_logits_TN is then
    used for the count; random logits stand in when it is None)."""
    slots = SlotCounts.from_routing(topk_ids_TK, cfg)
    costs = analytic_layer_costs(cfg, slots, residual=residual, backend=backend, dtype=dtype, backward=backward)
    counted = totals = None
    if layer is not None:
        prev = prev_logits_TN
        if residual and prev is None:
            prev = torch.randn(topk_ids_TK.shape[0], cfg.n_experts, generator=torch.Generator().manual_seed(seed))
        counted, totals = counted_layer_flops(layer, cfg, topk_ids_TK, gates_TK, prev_logits_TN=prev if residual
                                              else None, backend=backend, backward=backward, seed=seed)
    return LayerFlops(labels=labels, costs=costs, counted=counted, counted_totals=totals,
                      ffn_slot_fraction=ffn_slot_fraction(topk_ids_TK, cfg), rho=cfg.rho)
