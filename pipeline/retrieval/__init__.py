"""Retrieval: FAISS indexes over an output and nearest-neighbour search."""
