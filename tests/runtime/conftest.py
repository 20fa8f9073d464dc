import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine threads spinning
    against each other make them 10x slower; one thread keeps the runtime tests fast and steady. Module
    scope, so tests in other folders run with their own thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
