"""Language models trained from scratch: `train` (on the engine's loop), `evaluate`, `sample`."""
