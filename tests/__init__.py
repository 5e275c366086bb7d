"""Tests mirror the packages: tests/unlearn, tests/interventions, tests/recipes."""

# beartype must be imported before nnsight: nnsight patches builtins at import time in a way that
# makes beartype's own import fail ("unhashable type: 'instancemethod'"). Importing it here, in
# the package every test module (and every DDP worker importing one) loads first, fixes the order.
import beartype  # noqa: F401
