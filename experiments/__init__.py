"""What users run: pre-training, benchmarks, scaling studies, notebooks."""
