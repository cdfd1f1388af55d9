"""Figures from the MoE++ paper (arXiv 2410.07348) to compare with: Table 3, expert forward time in ms.

The paper does not state its hardware or batch size; compare shapes (speedup against tau, distance from
the ideal 1/rho), not absolute times.
"""

# (preset, tau): (MoE ms, MoE++ ms, speedup, ideal 1/rho)
TABLE3 = {
    ("0.6b", 0.10): (535.3, 202.4, 2.64, 6.00),
    ("0.6b", 0.25): (535.3, 277.8, 1.93, 3.00),
    ("0.6b", 0.50): (535.3, 387.3, 1.38, 2.00),
    ("0.6b", 0.75): (535.3, 427.6, 1.25, 1.67),
    ("0.6b", 1.00): (535.3, 449.6, 1.19, 1.50),
    ("1b", 0.10): (610.9, 289.3, 2.11, 3.50),
    ("1b", 0.25): (610.9, 384.9, 1.59, 2.00),
    ("1b", 0.50): (610.9, 469.7, 1.30, 1.50),
    ("1b", 0.75): (610.9, 500.3, 1.22, 1.33),
    ("1b", 1.00): (610.9, 530.2, 1.15, 1.25),
    ("2b", 0.10): (683.4, 417.9, 1.64, 3.50),
    ("2b", 0.25): (683.4, 473.7, 1.44, 2.00),
    ("2b", 0.50): (683.4, 532.7, 1.28, 1.50),
    ("2b", 0.75): (683.4, 561.0, 1.22, 1.33),
    ("2b", 1.00): (683.4, 590.5, 1.16, 1.25),
    ("7b", 0.75): (1859.0, 1455.0, 1.28, 1.33),
}
PAPER_PRESETS = ("0.6b", "1b", "2b", "7b")
TAU_SWEEP = (0.1, 0.25, 0.5, 0.75, 1.0)


def paper_row(preset: str, tau: float) -> dict:
    """The paper's Table 3 entry as columns, or an empty dict where the paper has none."""
    entry = TABLE3.get((preset, round(tau, 2)))
    if entry is None:
        return {}
    moe_ms, moepp_ms, speedup, ideal = entry
    return {"paper_moe_ms": moe_ms, "paper_moepp_ms": moepp_ms, "paper_speedup": speedup,
            "paper_ideal_speedup": ideal, "paper_efficiency": round(speedup / ideal, 3)}
