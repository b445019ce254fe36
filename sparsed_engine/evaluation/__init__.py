"""Fidelity measures shared by the benchmarks and the tests: held-out text, retrieval prompts, a
RULER-style task suite, masked-token NLL and agreement with dense, the ablation and probe backends,
and the statistics that say whether two settings differ."""
