"""Shared test setup: an isolated data cache, offline hubs, and tiny-run overrides."""

import atexit
import os
import shutil
import tempfile

import pytest

# Set before any config is composed: data.cache_dir resolves PICOLLM_CACHE at compose time.
# Each pytest process (the controller and every xdist worker) has its own, removed at exit
# (each run once left ~9 MB per process in /tmp).
os.environ["PICOLLM_CACHE"] = tempfile.mkdtemp(prefix="picollm-test-cache-")
atexit.register(shutil.rmtree, os.environ["PICOLLM_CACHE"], ignore_errors=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# Under pytest-xdist (scripts/test.sh runs one worker per core) every worker and the
# processes its tests start use one thread: two workers at two threads each would
# oversubscribe the cores, and OpenMP slows down by up to 10x when they are.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

# A run that takes seconds: 2-layer model, 300-token BPE on 150 stdlib files.
TINY = [
    "model=tiny", "model.seq_len=32", "tokenizer.vocab_size=300", "tokenizer.train_chars=300000",
    "data.max_docs=150", "data.val_fraction=0.05", "train.eval_tokens=2048", "train.log_every=1000",
    "budget.probe_seconds=0.5", "train.report=false",  # tests that want the end-of-run report turn it on
    # fp32 unless a test asks for auto: a run then trains the same way on every CPU (auto picks
    # bf16 where that measures faster), and skips the dtype probe, ~3 s a process on a CPU
    # without bf16 units. The tests of auto itself set train.dtype=auto.
    "train.dtype=fp32",
]


def prepare_first(overrides):
    """Prepare (or reuse) a run's data in this process's cache before a timed budget.minutes
    run: a run prepares its data after its plan, so a cold cache counts as a late start (many
    seconds of a half-minute budget on a loaded machine), and the test would depend on which
    tests ran before it in the same worker."""
    from picollm.config import load_config
    from picollm.data.prepare import prepare_data

    cfg = load_config(overrides)
    prepare_data(cfg.data, cfg.tokenizer, 10**12)  # the whole (small) corpus


@pytest.fixture
def tiny(tmp_path):
    """Overrides for a tiny run in a fresh run_dir."""
    return TINY + [f"run_dir={tmp_path / 'run'}"]


# The files that take longest run first: pytest-xdist hands out whole files (--dist loadfile)
# in collection order, and with test_train.py (~150 s of the ~640 s total) collected last,
# one worker trained it alone while the other had finished (the suite took 371-380 s; 357-360 s
# with these first, against ~310 s if perfectly even). Order within a file is kept.
LONGEST_FIRST = ("test_dist.py", "test_train.py", "test_resume.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order
