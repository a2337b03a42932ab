"""Training recipes; each exposes ``step(batch) -> (losses, logs)``."""
