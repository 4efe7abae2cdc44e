"""Run: the driver that plans and schedules shards, and the Ray actor that processes them."""
