import os
import tempfile

import pytest

# The tests' feature cache (command_line.FEATURE_CACHE reads it at import): never the user's ~/.cache.
os.environ["DPC_FEATURE_CACHE"] = tempfile.mkdtemp(prefix="dpc_features_")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The test models are tiny: one thread is faster than several, and on a busy 2-core machine
    torch's threads spin-wait (a module took 60-75 s instead of 10 s). torch is imported here, not at the
    top: xdist's controller reads this file too, and starts its workers 3.5 s sooner without torch."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The longest fixture (over a minute): its file goes to one worker, first of all.
FIRST = ("test_toy_world",)
# Module fixtures that build in seconds but are read by long tests: not worth serialising those tests.
UNGROUPED = {("test_cluster", "world"), ("test_reliability", "world")}
# Module fixtures that train runs (seconds each): the tests that read them are `slow` as a whole.
SLOW_FIXTURES = {("test_toy_world", "toy_runs"), ("test_reproduce", "toy"), ("test_interpret", "world"),
                 ("test_train_backbone", "runs"), ("test_experiments", "tab3"), ("test_checkpoints", "world"),
                 ("test_figures", "runs"), ("test_evaluate", "runs"), ("test_dept", "run"), ("test_reliability", "world"),
                 ("test_train_dpc", "runs"), ("test_cluster", "world"), ("test_user_inputs", "run")}


def module_fixtures(item) -> list[str]:
    """The module-scoped fixtures of the test's own file that `item` uses (directly or through another),
    less the cheap ones of UNGROUPED."""
    names = []
    for name in item.fixturenames:
        defs = item._fixtureinfo.name2fixturedefs.get(name) or ()
        if defs and defs[-1].scope == "module" and defs[-1].baseid.endswith(".py") and \
                (item.module.__name__, name) not in UNGROUPED:
            names.append(name)
    return sorted(names)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """pytest.ini runs the suite on two workers with --dist loadgroup: the tests that read one expensive
    module fixture (trained runs, a generated world) go to one worker together, so that it is built once;
    every other test goes to whichever worker is free. The files of FIRST are one group each and lead the
    queue (--no-loadscope-reorder keeps this order), so that the longest work starts at once. Runs before
    xdist's own hook (tryfirst), which turns the marks into groups."""
    for item in items:
        module = item.module.__name__
        if module in FIRST:
            group = module
        else:
            fixtures = module_fixtures(item)
            group = module + ":" + "+".join(fixtures) if fixtures else None
        if group and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(group))
        if any((module, name) in SLOW_FIXTURES for name in item.fixturenames):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: FIRST.index(item.module.__name__) if item.module.__name__ in FIRST else len(FIRST))
