import numpy as np
import pytest


@pytest.fixture
def rng(request):
    # A seed per test, stable across runs, so a failure reproduces.
    return np.random.default_rng(abs(hash(request.node.nodeid)) % (2**32))
