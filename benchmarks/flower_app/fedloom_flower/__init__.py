"""fedloom's digits job as a Flower App (see benchmarks/bench_vs_flower.py)."""
