"""Training: the typed config, the strategy/precision set-up and the training loop."""
