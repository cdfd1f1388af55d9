"""moepp-bench: measure what zero-computation experts buy (throughput, FLOPs, all-to-all, routing)."""
