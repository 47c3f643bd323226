"""Training: the per-worker loop (loop.py) and the TorchTrainer around it (trainer.py)."""
