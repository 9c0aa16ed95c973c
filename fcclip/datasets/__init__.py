"""Dataset readers and synthetic data generators."""
