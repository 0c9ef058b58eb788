"""lors: parameter-efficient network stacking with low-rank residuals."""
__version__ = "0.1.0"
