"""Routing generators: realised loads match their spec, K distinct experts per token, gates sum to 1,
replay round trips, and bad specs fail early with one line."""

from __future__ import annotations

import math

import pytest
import torch

from moepp.config import MoEConfig, layer_preset
from moepp_bench.errors import BenchError
from moepp_bench.measure.routing_gen import (ffn_slot_fraction, generate_routing, parse_routing_spec,
                                             vanilla_routing_spec, write_routing_file)

pytestmark = pytest.mark.usefixtures("single_thread")

TAU_SWEEP = (0.1, 0.25, 0.5, 0.75, 1.0)
# Several expert counts: the presets' (4+4, 8+4, 16+4, 32+8) and an odd one with K=3.
LAYERS = {
    "tiny": layer_preset("tiny"),
    "0.6b": layer_preset("0.6b"),
    "1b": layer_preset("1b"),
    "2b": layer_preset("2b"),
    "odd": MoEConfig(d_model=8, d_expert=8, n_ffn=7, n_zero=1, n_copy=2, n_constant=3, top_k=3),
}


def assert_valid(ids_TK: torch.Tensor, gates_TK: torch.Tensor, cfg: MoEConfig, T: int) -> None:
    K = cfg.top_k
    assert ids_TK.shape == (T, K) and ids_TK.dtype == torch.long
    assert gates_TK.shape == (T, K) and gates_TK.dtype == torch.float32
    assert int(ids_TK.min()) >= 0 and int(ids_TK.max()) < cfg.n_experts
    sorted_TK = ids_TK.sort(dim=1).values
    assert (sorted_TK[:, 1:] != sorted_TK[:, :-1]).all(), "a token chose the same expert twice"
    assert torch.allclose(gates_TK.sum(1), torch.ones(T), atol=1e-6)
    assert (gates_TK >= 0).all()


def type_counts(ids_TK: torch.Tensor, cfg: MoEConfig, kind: str) -> list[int]:
    counts = torch.bincount(ids_TK.reshape(-1), minlength=cfg.n_experts)
    return [int(counts[i]) for i in cfg.type_range(kind)]


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("tau", TAU_SWEEP)
def test_balanced_matches_rho(name, tau):
    cfg = LAYERS[name].replace(tau=tau)
    T = 3001  # odd, so slot counts do not divide evenly
    ids, gates = generate_routing("balanced", cfg, T, seed=1)
    assert_valid(ids, gates, cfg, T)
    S = T * cfg.top_k
    rho = tau * cfg.n_ffn / (tau * cfg.n_ffn + cfg.n_zc)
    # Counts are assigned, not sampled: the realised share is rho rounded to whole slots.
    assert abs(ffn_slot_fraction(ids, cfg) - rho) <= 0.5 / S + 1e-12
    for kind in ("ffn", "constant", "copy", "zero"):
        counts = type_counts(ids, cfg, kind)
        if counts:
            assert max(counts) - min(counts) <= 1, f"{kind} experts unevenly loaded: {counts}"
    zc = type_counts(ids, cfg, "constant") + type_counts(ids, cfg, "copy") + type_counts(ids, cfg, "zero")
    assert max(zc) - min(zc) <= 1, "load must be even across all zero-computation experts"


def test_balanced_is_shuffled_across_tokens_and_positions():
    cfg = LAYERS["1b"].replace(tau=0.5)
    ids, _ = generate_routing("balanced", cfg, 4000, seed=0)
    first_half, second_half = ids[:2000], ids[2000:]
    # Each half of the tokens, and each position k, carries about the same FFN share (no block layout left).
    for part in (first_half, second_half, ids[:, :1], ids[:, 1:]):
        assert abs(ffn_slot_fraction(part, cfg) - cfg.rho) < 0.03


def test_vanilla_balanced_is_all_ffn_and_even():
    cfg = LAYERS["1b"].vanilla()
    ids, gates = generate_routing("balanced", cfg, 1000)
    assert_valid(ids, gates, cfg, 1000)
    assert ffn_slot_fraction(ids, cfg) == 1.0
    counts = type_counts(ids, cfg, "ffn")
    assert max(counts) - min(counts) <= 1


@pytest.mark.parametrize("share", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_forced_share(share):
    cfg = LAYERS["1b"]
    T = 5000
    ids, gates = generate_routing(f"forced:{share}", cfg, T)
    assert_valid(ids, gates, cfg, T)
    assert abs((1 - ffn_slot_fraction(ids, cfg)) - share) <= 0.5 / (T * cfg.top_k)
    zc = type_counts(ids, cfg, "constant") + type_counts(ids, cfg, "copy") + type_counts(ids, cfg, "zero")
    assert max(zc) - min(zc) <= 1


def test_forced_share_a_layer_cannot_hold_is_refused():
    # One ZC expert and K=2: at most half the slots can reach it while each token's experts stay distinct.
    cfg = MoEConfig(d_model=8, d_expert=8, n_ffn=4, n_zero=1, n_copy=0, n_constant=0)
    generate_routing("forced:0.5", cfg, 100)
    with pytest.raises(BenchError, match="only 100 tokens"):
        generate_routing("forced:0.8", cfg, 100)


def test_uniform_is_even_within_sampling_error():
    cfg = LAYERS["1b"]
    T = 20000
    ids, gates = generate_routing("uniform", cfg, T)
    assert_valid(ids, gates, cfg, T)
    counts = torch.bincount(ids.reshape(-1), minlength=cfg.n_experts).double()
    p = cfg.top_k / cfg.n_experts  # chance a token picks a given expert
    sigma = math.sqrt(T * p * (1 - p))
    assert ((counts - T * p).abs() < 5 * sigma).all()
    assert abs(ffn_slot_fraction(ids, cfg) - cfg.n_ffn / cfg.n_experts) < 0.02


def test_zipf_is_skewed_and_its_exponent_controls_the_skew():
    cfg = LAYERS["1b"]
    T = 20000

    def top_share(spec):
        ids, gates = generate_routing(spec, cfg, T, seed=3)
        assert_valid(ids, gates, cfg, T)
        counts = torch.bincount(ids.reshape(-1), minlength=cfg.n_experts).double()
        return (counts.max() / counts.sum()).item(), (counts.max() / counts.median()).item()

    share_0, ratio_0 = top_share("zipf:0")  # exponent 0: no skew at all
    share_d, ratio_d = top_share("zipf")  # default 1.2
    share_2, ratio_2 = top_share("zipf:2")
    assert ratio_0 < 1.2
    assert ratio_d > 4 and share_d > 2 * share_0
    assert share_2 > share_d


def test_same_seed_same_routing_other_seed_other_routing():
    cfg = LAYERS["tiny"]
    for spec in ("balanced", "uniform", "zipf", "forced:0.4"):
        a, ga = generate_routing(spec, cfg, 300, seed=5)
        b, gb = generate_routing(spec, cfg, 300, seed=5)
        c, _ = generate_routing(spec, cfg, 300, seed=6)
        assert torch.equal(a, b) and torch.equal(ga, gb)
        assert not torch.equal(a, c)


def test_replay_round_trip_tiles_and_truncates(tmp_path):
    cfg = LAYERS["1b"]
    layer0, _ = generate_routing("zipf", cfg, 50, seed=1)
    layer1, _ = generate_routing("uniform", cfg, 70, seed=2)
    path = write_routing_file(tmp_path, [layer0, layer1], cfg)
    assert path == tmp_path / "routing.safetensors"

    same, gates = generate_routing(f"replay:{tmp_path}", cfg, 50)  # directory, layer 0 by default
    assert torch.equal(same, layer0)
    assert_valid(same, gates, cfg, 50)
    longer, _ = generate_routing(f"replay:{path}:1", cfg, 160)  # the file itself, layer 1, tiled
    assert torch.equal(longer[:70], layer1) and torch.equal(longer[70:140], layer1)
    assert torch.equal(longer[140:], layer1[:20])
    shorter, _ = generate_routing(f"replay:{path}:1", cfg, 30)
    assert torch.equal(shorter, layer1[:30])


@pytest.mark.parametrize("spec, message", [
    ("learned", "unknown routing"),
    ("balanced:2", "takes no argument"),
    ("forced", "needs a share"),
    ("forced:1.5", r"must be in \[0, 1\]"),
    ("forced:-0.1", r"must be in \[0, 1\]"),
    ("forced:half", "not a number"),
    ("zipf:-1", ">= 0"),
    ("replay:/no/such/dir/routing.safetensors", "not found"),
    ("replay:", "needs a file"),
])
def test_bad_specs_raise_one_line(spec, message):
    with pytest.raises(BenchError, match=message) as info:
        parse_routing_spec(spec)
    assert "\n" not in str(info.value)


def test_replay_checks_the_layer(tmp_path):
    cfg = LAYERS["1b"]
    ids, _ = generate_routing("balanced", cfg, 20)
    write_routing_file(tmp_path, [ids], cfg)
    with pytest.raises(BenchError, match="recorded with 20 experts but the layer has 40"):
        parse_routing_spec(f"replay:{tmp_path}", LAYERS["2b"])
    with pytest.raises(BenchError, match="recorded with 20 experts"):
        generate_routing(f"replay:{tmp_path}", LAYERS["2b"], 10)
    with pytest.raises(BenchError, match="no layer 3"):
        parse_routing_spec(f"replay:{tmp_path}:3")
    # Same expert count, other mix of kinds (16 FFN + 4 ZC vs 12 FFN + 8 ZC): the FFN share would be wrong.
    other_mix = MoEConfig(d_model=8, d_expert=8, n_ffn=12, n_zero=1, n_copy=1, n_constant=6)
    with pytest.raises(BenchError, match="expert types"):
        parse_routing_spec(f"replay:{tmp_path}", other_mix)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BenchError, match="not a readable safetensors"):
        parse_routing_spec(f"replay:{tmp_path / 'junk.safetensors'}")


def test_zc_routing_on_a_vanilla_layer_is_refused():
    with pytest.raises(BenchError, match="has none"):
        generate_routing("forced:0.5", LAYERS["1b"].vanilla(), 10)
    generate_routing("forced:0", LAYERS["1b"].vanilla(), 10)


def test_non_positive_token_count_is_refused():
    with pytest.raises(BenchError, match="positive"):
        generate_routing("balanced", LAYERS["tiny"], 0)


def test_vanilla_counterpart_spec():
    assert vanilla_routing_spec("zipf:1.5") == "zipf:1.5"
    assert vanilla_routing_spec("uniform") == "uniform"
    assert vanilla_routing_spec("forced:0.3") == "balanced"
    assert vanilla_routing_spec("replay:/x/routing.safetensors") == "balanced"
