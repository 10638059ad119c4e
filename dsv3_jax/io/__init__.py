"""State on disk: Hugging Face safetensors in and out (hf), conversion between them and our checkpoints (convert),
and orbax checkpoints of a training run (checkpoint)."""
