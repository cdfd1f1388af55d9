"""Config validation names the bad field; presets have the paper's Table 2 shapes."""

from __future__ import annotations

import math

import pytest

from moepp import EXPERT_TYPES, ModelConfig, MoEConfig, layer_preset, model_preset

BASE = dict(d_model=64, d_expert=96, n_ffn=4)


@pytest.mark.parametrize("changes, field", [
    (dict(tau=0.0), "tau"),
    (dict(tau=-0.5), "tau"),
    (dict(tau=math.nan), "tau"),
    (dict(top_k=9), "top_k"),  # 4 FFN + 4 ZC experts
    (dict(top_k=0), "top_k"),
    (dict(n_zero=-1), "n_zero"),
    (dict(n_copy=-1), "n_copy"),
    (dict(n_constant=-2), "n_constant"),
    (dict(n_ffn=-1), "n_ffn"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(capacity_factor=-1.1), "capacity_factor"),
    (dict(gate_mode="softmax"), "gate_mode"),
    (dict(router="conv"), "router"),
    (dict(backend="magic"), "backend"),
    (dict(capacity_base="experts"), "capacity_base"),
    (dict(d_model=0), "d_model"),
])
def test_invalid_moe_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        MoEConfig(**{**BASE, **changes})


def test_unknown_preset_names_the_preset_and_the_choices():
    with pytest.raises(ValueError, match=r"unknown preset '3b'.*0\.6b.*7b"):
        model_preset("3b")
    with pytest.raises(ValueError, match="unknown preset"):
        layer_preset("huge")


def test_invalid_model_config_names_the_field():
    moe = MoEConfig(**BASE)
    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig(vocab_size=100, n_layers=2, n_heads=3, moe=moe)  # 64 is not divisible by 3
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(vocab_size=100, n_layers=2, n_heads=4, n_kv_heads=3, moe=moe)
    with pytest.raises(ValueError, match="vocab_size"):
        ModelConfig(vocab_size=0, n_layers=2, n_heads=4, moe=moe)


# Table 2 of the paper: layers, D, H, heads, FFN experts, zero / copy / constant.
TABLE_2 = {
    "0.6b": (12, 768, 2048, 12, 8, 1, 1, 2),
    "1b": (12, 768, 2048, 12, 16, 1, 1, 2),
    "2b": (12, 768, 2048, 12, 32, 1, 1, 6),
    "7b": (24, 1536, 4096, 16, 16, 1, 1, 2),
}


@pytest.mark.parametrize("name", list(TABLE_2))
def test_presets_have_the_paper_shapes(name):
    cfg = model_preset(name)
    m = cfg.moe
    got = (cfg.n_layers, cfg.d_model, m.d_expert, cfg.n_heads, m.n_ffn, m.n_zero, m.n_copy, m.n_constant)
    assert got == TABLE_2[name]
    assert (m.top_k, cfg.vocab_size, m.tau, m.balance_coef) == (2, 65536, 0.75, 0.01)
    # Fixed expert order, the official one: FFN, constant, copy, zero.
    assert m.expert_types == ("ffn",) * m.n_ffn + ("constant",) * m.n_constant + ("copy", "zero")
    vanilla = model_preset(name, vanilla=True).moe
    assert (vanilla.n_zc, vanilla.n_ffn, vanilla.d_expert) == (0, m.n_ffn, m.d_expert)


def test_vanilla_drops_only_the_zc_experts():
    cfg = MoEConfig(**BASE, n_constant=6, tau=0.3, gate_mode="official")
    v = cfg.vanilla()
    assert (v.n_zero, v.n_copy, v.n_constant, v.n_experts) == (0, 0, 0, 4)
    assert v.replace(n_zero=1, n_copy=1, n_constant=6) == cfg
    assert v.rho == 1.0  # every slot reaches an FFN expert


def test_type_ranges_follow_the_official_order():
    cfg = MoEConfig(**BASE, n_constant=6)
    assert [(k, cfg.type_range(k)) for k in EXPERT_TYPES] == [
        ("ffn", range(0, 4)), ("constant", range(4, 10)), ("copy", range(10, 11)), ("zero", range(11, 12))]
    with pytest.raises(ValueError, match="unknown expert kind"):
        cfg.type_range("dense")


def test_rho_and_capacities_follow_the_formulas():
    cfg = MoEConfig(**{**BASE, "n_ffn": 16}, tau=0.75, capacity_factor=1.1)  # 1B: 16 FFN + 4 ZC
    assert math.isclose(cfg.rho, 0.75 * 16 / (0.75 * 16 + 4))
    T = 1000
    c_ffn, c_zc = cfg.capacities(T)
    denom = 0.75 * 16 + 4
    assert c_ffn == math.ceil(1.1 * 0.75 * 2 * T / denom) and c_zc == math.ceil(1.1 * 2 * T / denom)
    # At balance each kind's total capacity is gamma times its expected load (rho or 1 - rho of the K*T slots).
    assert c_ffn * 16 >= 1.1 * cfg.rho * 2 * T - 1e-9 and c_zc * 4 >= 1.1 * (1 - cfg.rho) * 2 * T - 1e-9
    assert cfg.replace(capacity_base="tokens").capacities(T) == (math.ceil(1.1 * 0.75 * T / denom),
                                                                 math.ceil(1.1 * T / denom))
    assert cfg.replace(capacity_factor=None).capacities(T) is None


def test_model_config_round_trips_through_a_dict():
    cfg = model_preset("tiny", gate_mode="mixtral", capacity_factor=1.25).replace(tie_embeddings=True)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    bad = cfg.to_dict()
    bad["moe"]["n_experts_total"] = 3
    with pytest.raises(ValueError, match="n_experts_total"):
        ModelConfig.from_dict(bad)
