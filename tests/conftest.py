"""Shared test fixtures."""
import os

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread (restored afterwards): small tensors are faster without thread
    hand-offs, and other jobs sharing the cores do not stall it. Use with pytest.mark.usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers:  # pytest -n N: the cores are shared, so each worker (and what it launches) gets its share of threads
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        # numpy/scipy's OpenBLAS read OMP_NUM_THREADS when they loaded (before this hook) and start one thread per
        # core: two workers' FID eigendecompositions (2048²) then run 4 spinning threads on 2 cores, 2-5× slower
        # than one thread each. The processes the tests launch inherit OMP_NUM_THREADS and agree with this.
        try:
            from threadpoolctl import threadpool_limits  # a scikit-learn dependency (requirements.txt)
        except ImportError:
            pass
        else:
            threadpool_limits(threads, user_api="blas")
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one; run by benchmarks/gpu_check.py)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device here: benchmarks/gpu_check.py runs these on a GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
