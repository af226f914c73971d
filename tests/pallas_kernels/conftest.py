"""Kernel tests run on the CPU backend; libtpu (when installed) is only loaded for abstract AOT topologies."""

import os
import sys

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# pytest-xdist workers may each load libtpu for AOT compiles; libtpu's single-process lockfile would refuse.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# pytest runs with --import-mode=importlib, which adds no test folder to sys.path: make kernel_testutils importable.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """Fresh random inputs every run; the seed is recorded in the report so a failure can be replayed."""
    seed = int(os.environ.get("K2JAX_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return np.random.default_rng(seed)


@pytest.fixture
def kernel_env(monkeypatch: pytest.MonkeyPatch):
    """Sets K2JAX_KERNELS for one test; `native` is skipped where no C++ compiler can build the CPU kernel."""
    import jax

    from pallas_kernels import cpu_build, dispatch

    def use(mode: str) -> None:
        if mode == "native" and not cpu_build.available():
            pytest.skip("no C++ compiler: the native CPU kernel cannot be built")
        monkeypatch.setenv(dispatch.ENV_VAR, mode)
        jax.clear_caches()  # the mode is read at trace time: no program traced under another mode may be reused

    return use


@pytest.fixture
def no_persistent_cache():
    """Ahead-of-time compiles for abstract devices stay out of the persistent compilation cache."""
    from k2jax.plan import persistent_cache_off

    with persistent_cache_off():
        yield
