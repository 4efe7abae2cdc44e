"""Input: storage access (fsspec), input forms and listing, the shard plan, the shard reader."""
