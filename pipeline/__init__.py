"""kdpipe: distil CLIP teachers into small students from cached teacher embeddings."""

__version__ = "0.1.0"
