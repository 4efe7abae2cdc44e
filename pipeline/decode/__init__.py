"""Decode: CPU and GPU image decoders and the preprocessing recipe."""
