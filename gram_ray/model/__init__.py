"""The GRAM model: Hugging Face encoders, projection heads, the volume contrastive loss."""
