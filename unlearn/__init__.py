"""unlearn: make a language model forget a knowledge domain, then test whether it stays forgotten.

The package holds the science: the embedded toy world (`unlearn.toyworld`), model loading
(`unlearn.models`), multiple-choice evaluation (`unlearn.eval`), and, as later issues land, losses,
methods, the training core and the tamper attack. Activation reads and writes live in the sibling
package `interventions`; runnable entry points live in `recipes` (`python -m recipes.<name>`).
"""

__version__ = "0.1.0"
