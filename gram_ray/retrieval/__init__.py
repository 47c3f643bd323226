"""What a trained model is for: retrieval metrics, reranking by the match head, the volume search index."""
