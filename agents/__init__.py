"""RL training, evaluation against baselines and checkpoint I/O."""
