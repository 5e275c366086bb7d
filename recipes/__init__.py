"""Runnable recipes: `python -m recipes.<name>`, one file = one Config dataclass + `main()`."""
