"""Command-line entry points (thin wrappers over envs, controllers and agents)."""
