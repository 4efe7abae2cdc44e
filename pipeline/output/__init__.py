"""Output: the Parquet writer, exactly-once verification and reading embeddings back."""
