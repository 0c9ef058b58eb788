"""Data sets used by the experiments."""
