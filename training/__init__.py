"""The training steps: data and images, rewards, evaluation, generation, checkpoints, curves, lineage."""
