"""Speed benchmarks of the pretraining pipeline (run: python -m benchmarks.speed --help)."""
