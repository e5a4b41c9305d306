"""What a person looks at: PNGs that carry their settings and contact sheets (images.py), figures (figures.py),
TensorBoard (tensorboard.py), Weights & Biases (wandb.py)."""
