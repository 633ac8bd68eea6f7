"""The kernel config (``fastdpo.kernels.config``): ``use_config`` is context-local, so one thread's config does not
reach another."""

import threading

from fastdpo.kernels.config import INTERPRETER_DEFAULT, KernelConfig, default_config, use_config


def test_use_config_does_not_leak_into_other_threads():
    """A config set by use_config holds in its own thread only, nests, and is undone on exit."""
    mine = KernelConfig(vocab_chunk=7, min_programs=3)
    inside, seen = threading.Event(), {}

    def other():
        inside.wait(timeout=30)
        seen["other"] = default_config()

    worker = threading.Thread(target=other)
    worker.start()
    with use_config(mine):
        inside.set()
        worker.join(timeout=30)
        seen["mine"] = default_config()
    assert seen["mine"] is mine
    assert seen["other"] is not mine and seen["other"] == INTERPRETER_DEFAULT
    assert default_config() == INTERPRETER_DEFAULT
    with use_config(mine), use_config(INTERPRETER_DEFAULT):
        assert default_config() is INTERPRETER_DEFAULT
    assert default_config() is not mine
