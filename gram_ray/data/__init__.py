"""Data: annotation manifests, media decoding, the Ray Data preprocessing pipeline, synthetic data."""
