"""The training recipe: losses, AdamW with DeepSeek's schedule, routing-bias balancing, the jitted step."""
