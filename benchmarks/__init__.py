"""Speed and quality benchmarks: `python -m benchmarks.<name>`; results in benchmarks/results/."""
