"""Expert parameters: a bank of SwiGLU FFN experts with stacked weights, and the zero-computation experts.

Weight layouts follow the official checkpoints so loading is a stack, not a transpose:
  w_up   [E, 2H, D]  rows 0..H-1 feed silu (the gate half), rows H..2H-1 are the linear half
  w_down [E, D, H]
  const_v  [C, D]    the constant vector v of each constant expert
  const_wc [C, 2, D] W_c of each constant expert: [a1, a2] = softmax(W_c x)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig


def swiglu(h_R2H: torch.Tensor) -> torch.Tensor:
    """silu(gate half) * linear half of a fused up-projection output."""
    gate_RH, up_RH = h_R2H.chunk(2, dim=-1)
    return F.silu(gate_RH) * up_RH


class FFNExperts(nn.Module):
    """N_FFN SwiGLU experts, weights stacked on a leading expert axis."""

    def __init__(self, cfg: MoEConfig, init_std: float = 0.02):
        super().__init__()
        E, D, H = cfg.n_ffn, cfg.d_model, cfg.d_expert
        self.w_up = nn.Parameter(torch.randn(E, 2 * H, D) * init_std)
        self.w_down = nn.Parameter(torch.randn(E, D, H) * init_std)


class ZeroComputationExperts(nn.Module):
    """Constant experts' parameters; zero and copy experts have none."""

    def __init__(self, cfg: MoEConfig, init_std: float = 0.02):
        super().__init__()
        C, D = cfg.n_constant, cfg.d_model
        self.n_ffn = cfg.n_ffn
        self.n_constant = C
        self.copy_range = cfg.type_range("copy")
        self.const_v = nn.Parameter(torch.randn(C, D))
        self.const_wc = nn.Parameter(torch.randn(C, 2, D) * init_std)

    def constant_expert(self, c: int, x_RD: torch.Tensor) -> torch.Tensor:
        """Constant expert c (0-based among constant experts): a1 x + a2 v."""
        a_R2 = torch.softmax(F.linear(x_RD, self.const_wc[c]), dim=-1)
        return a_R2[:, :1] * x_RD + a_R2[:, 1:] * self.const_v[c]

    def rows(self, x_RD: torch.Tensor, expert_R: torch.Tensor) -> torch.Tensor:
        """Unweighted output of copy / constant experts for rows routed to them (other rows give 0).

        One small matmul gives every constant expert's [a1, a2] for every row, then each row picks its own,
        so no Python loop over experts and no host sync.
        """
        R, D = x_RD.shape
        C = self.n_constant
        is_copy_R = (expert_R >= self.copy_range.start) & (expert_R < self.copy_range.stop)
        if C == 0:
            return x_RD * is_copy_R.unsqueeze(1).to(x_RD.dtype)
        const_idx_R = expert_R - self.n_ffn
        is_const_R = (const_idx_R >= 0) & (const_idx_R < C)
        c_R = const_idx_R.clamp(0, C - 1)
        a_all_RC2 = torch.softmax(F.linear(x_RD, self.const_wc.reshape(C * 2, D)).view(R, C, 2), dim=-1)
        a_R2 = a_all_RC2.gather(1, c_R.view(R, 1, 1).expand(R, 1, 2)).squeeze(1)
        mask_c = is_const_R.to(x_RD.dtype)
        coef_x_R = torch.where(is_copy_R, torch.ones_like(a_R2[:, 0]), a_R2[:, 0] * mask_c)
        coef_v_R = a_R2[:, 1] * mask_c
        return coef_x_R.unsqueeze(1) * x_RD + coef_v_R.unsqueeze(1) * self.const_v.index_select(0, c_R)

    def add_token_terms(self, y_TD: torch.Tensor, x_TD: torch.Tensor, tok_R: torch.Tensor, expert_R: torch.Tensor,
                        gate_R: torch.Tensor, n_const_slots: int) -> torch.Tensor:
        """Add the copy and constant experts' outputs for slots sorted by expert (constant slots first).

        Per slot only scalars are computed (the gate g, and a = softmax(W_c x) for constant slots, which needs
        just those slots' rows); they fold into one coefficient of x per token and one of each v, applied in
        two fused passes: y += cx_T * x + cv_TC @ v. No [slots, D] tensor is materialised for copy slots.
        """
        T = x_TD.shape[0]
        C = self.n_constant
        cx_T = torch.zeros(T, dtype=gate_R.dtype, device=x_TD.device)
        if n_const_slots:
            tok_c, g_c = tok_R[:n_const_slots], gate_R[:n_const_slots]
            c_R = expert_R[:n_const_slots] - self.n_ffn
            D = x_TD.shape[1]
            logits_all = F.linear(x_TD.index_select(0, tok_c), self.const_wc.reshape(C * 2, D)).view(-1, C, 2)
            a_R2 = torch.softmax(logits_all.gather(1, c_R.view(-1, 1, 1).expand(-1, 1, 2)).squeeze(1).float(), -1)
            cx_T = cx_T.index_add(0, tok_c, g_c * a_R2[:, 0])
            cv_TC = torch.zeros(T, C, dtype=gate_R.dtype, device=x_TD.device)
            cv_TC = cv_TC.index_put((tok_c, c_R), g_c * a_R2[:, 1], accumulate=True)
            y_TD = y_TD.addmm(cv_TC.to(y_TD.dtype), self.const_v.to(y_TD.dtype))
        if n_const_slots < tok_R.numel():
            cx_T = cx_T.index_add(0, tok_R[n_const_slots:], gate_R[n_const_slots:])
        # In place: addcmul_'s backward does not need the old y, so this saves a [T, D] buffer.
        return y_TD.addcmul_(x_TD, cx_T.to(x_TD.dtype).unsqueeze(1))

