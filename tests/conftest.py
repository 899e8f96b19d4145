import pytest
import torch

# Small tensors on a shared 2-core box: a second intra-op thread only adds wake-up latency (measured: a min/max
# of a 64x520 tensor took 78 ms with 2 loaded threads, 0.08 ms with one), and DDP workers must not oversubscribe.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
