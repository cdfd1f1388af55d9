"""A Llama-style decoder LM whose MLPs are MoE(++) layers threading the gating residual."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layer import MoELayer, RoutingRecord


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, cast back, then scale: the order the official checkpoints were trained with.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float, device, dtype):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    freqs_SH = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs_SH, freqs_SH), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, hd = cfg.d_model, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, hd
        self.q_proj = nn.Linear(D, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(D, cfg.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(D, cfg.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * hd, D, bias=False)

    def forward(self, x_BSD, cos_SH, sin_SH, mask_B1SS):
        B, S, _ = x_BSD.shape
        q = self.q_proj(x_BSD).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BSD).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BSD).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos_SH + rotate_half(q) * sin_SH
        k = k * cos_SH + rotate_half(k) * sin_SH
        if self.n_kv != self.n_heads:
            rep = self.n_heads // self.n_kv
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if mask_B1SS is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1SS)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, -1))


class DenseMLP(nn.Module):
    """SwiGLU MLP for the non-MoE layers when moe_interval > 1."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_hidden, bias=False)
        self.up_proj = nn.Linear(d_model, d_hidden, bias=False)
        self.down_proj = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, init_std: float):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(index)
        if self.is_moe:
            self.moe = MoELayer(cfg.moe, init_std)
        else:
            self.mlp = DenseMLP(cfg.d_model, cfg.d_dense or cfg.moe.d_expert)


@dataclass
class LMOutput:
    logits: torch.Tensor | None  # [B, S, V] float32 (None with return_logits=False)
    loss: torch.Tensor | None = None  # ce_loss + aux_loss when labels were given
    ce_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # sum over MoE layers of beta * L_b + z_coef * L_z
    balance_loss: torch.Tensor | None = None  # sum over MoE layers of L_b (unweighted)
    z_loss: torch.Tensor | None = None
    n_dropped: torch.Tensor | None = None  # dropped slots over all MoE layers
    routing: list[RoutingRecord] | None = field(default=None)


class MoEDecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig, init_std: float = 0.02):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, init_std) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=init_std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [layer.moe for layer in self.layers if layer.is_moe]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        return_routing: bool = False,
        gating_residual: bool = True,
        backend: str | None = None,
        return_logits: bool = True,
    ) -> LMOutput:
        """input_ids: [B, S] long. attention_mask: [B, S] (1 = real token). labels: [B, S], -100 ignored;
        shifted inside (position s predicts s+1). gating_residual=False ablates the residual at inference.
        return_logits=False skips the LM head (logits None): routing analyses need only the MoE layers, and
        the head can cost more than the whole decoder for a small model with a large vocabulary."""
        if labels is not None and not return_logits:
            raise ValueError("labels need logits: do not pass return_logits=False with labels")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        B, S = input_ids.shape
        if S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds max_seq_len={self.cfg.max_seq_len}")
        x_BSD = self.embed(input_ids)
        dtype = x_BSD.dtype
        cos_SH, sin_SH = rotary_cos_sin(S, self.cfg.head_dim, self.cfg.rope_theta, x_BSD.device, dtype)
        mask_B1SS = None
        valid_T = None
        if attention_mask is not None:
            keep_BS = attention_mask.bool()
            valid_T = keep_BS.reshape(-1)
            causal_SS = torch.ones(S, S, dtype=torch.bool, device=x_BSD.device).tril()
            allowed = causal_SS.unsqueeze(0) & keep_BS.unsqueeze(1)
            # A fully masked row (a padding query) would give NaN; let it see itself.
            allowed = allowed | torch.eye(S, dtype=torch.bool, device=x_BSD.device).unsqueeze(0)
            mask_B1SS = allowed.unsqueeze(1)

        prev_logits = None
        aux = balance = zl = x_BSD.new_zeros((), dtype=torch.float32)
        n_dropped = torch.zeros((), dtype=torch.long, device=x_BSD.device)
        routing = [] if return_routing else None
        for layer in self.layers:
            x_BSD = x_BSD + layer.attn(layer.attn_norm(x_BSD), cos_SH, sin_SH, mask_B1SS)
            h_BSD = layer.mlp_norm(x_BSD)
            if layer.is_moe:
                out = layer.moe(h_BSD, prev_logits if gating_residual else None, return_record=return_routing,
                                valid_T=valid_T, backend=backend)
                prev_logits = out.logits_TN
                x_BSD = x_BSD + out.y
                aux = aux + layer.moe.aux_loss(out)
                balance = balance + out.balance_loss
                zl = zl + out.z_loss
                n_dropped = n_dropped + out.n_dropped
                if routing is not None:
                    routing.append(out.record)
            else:
                x_BSD = x_BSD + layer.mlp(h_BSD)
        logits = self.lm_head(self.norm(x_BSD)).float() if return_logits else None

        result = LMOutput(logits=logits, aux_loss=aux, balance_loss=balance, z_loss=zl, n_dropped=n_dropped,
                          routing=routing)
        if labels is not None:
            ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                 ignore_index=-100)
            result.ce_loss = ce
            result.loss = ce + aux
        return result
