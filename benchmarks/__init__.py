"""Speed and quality benchmarks: `python -m benchmarks.<name>`; results go to benchmarks/results/."""
