"""Experiments: what is trained, swept, measured and reported, built on `lors.engine`."""
