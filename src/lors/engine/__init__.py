"""Training, fine-tuning and evaluation loops."""
