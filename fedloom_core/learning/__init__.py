"""Weights I/O, aggregation kernels, strategies, training, the model zoo and data (no torch on import)."""
