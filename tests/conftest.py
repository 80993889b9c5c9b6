import os
import tempfile

import pytest
import torch

# The tests' feature cache (command_line.FEATURE_CACHE reads it at import): never the user's ~/.cache.
os.environ["DPC_FEATURE_CACHE"] = tempfile.mkdtemp(prefix="dpc_features_")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The test models are tiny: one thread is faster than several, and on a busy 2-core machine
    torch's threads spin-wait (a module took 60-75 s instead of 10 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def module_fixtures(item) -> list[str]:
    """The module-scoped fixtures of the test's own file that `item` uses (directly or through another)."""
    names = []
    for name in item.fixturenames:
        defs = item._fixtureinfo.name2fixturedefs.get(name) or ()
        if defs and defs[-1].scope == "module" and defs[-1].baseid.endswith(".py"):
            names.append(name)
    return sorted(names)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """pytest.ini runs the suite on two workers with --dist loadgroup: tests that read one expensive
    module fixture (a trained run, a generated world) go to one worker together, so that it is built
    once; every other test is handed to whichever worker is free. Before xdist's own hook (tryfirst),
    which turns the marks into the groups. Tests marked `slow` run the scripts end to end for seconds
    or minutes: `python -m pytest -m "not slow"` leaves them out while editing."""
    for item in items:
        fixtures = module_fixtures(item)
        if fixtures and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__ + ":" + "+".join(fixtures)))
