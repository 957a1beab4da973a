import os

import pytest

# Tests never touch the network or a GPU, whatever the caller's environment says.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# scripts/setup_env.sh's allocator setting, for pytest run without it (read once, at torch's import)
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    """Tokenizer, text documents of one packed row each and an initial ``model=tiny`` directory,
    built once per test run (``test_train.make_setup``); tests only read it."""
    from test_train import make_setup

    return make_setup(tmp_path_factory.mktemp("train"))


@pytest.fixture(scope="session")
def one_process(setup, tmp_path_factory):
    """The reference run: one process, two rows a step, 4 steps (``test_train.overrides``); tests
    compare other layouts with it and only read it."""
    from test_train import overrides, run

    run_dir = tmp_path_factory.mktemp("one") / "run"
    run(1, overrides(setup, run_dir, "train.micro_batch_size=2"))
    return run_dir


def pytest_collection_modifyitems(items):
    """A test that trains through the real stack (it uses the ``setup`` fixture: DeepSpeed runs in
    one or two processes) is ``slow``; the others that launch processes carry the mark themselves."""
    for item in items:
        if "setup" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
