"""Vision transformers trained from scratch on Fashion-MNIST: `train`, `compare`."""
