"""gram-ray: train GRAM (Gramian multimodal representation learning) models on Ray clusters."""

__version__ = "0.1.0"
