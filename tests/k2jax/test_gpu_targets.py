"""The environment of GPU-compiling child processes."""

from k2jax import gpu_targets


def test_gpu_children_compile_at_the_default_optimization_level(monkeypatch, tmp_path):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x --xla_backend_optimization_level=0 --xla_cpu_ftz=false")
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    env = gpu_targets.plugin_env(tmp_path)
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_cpu_ftz=false"
    assert env["PYTHONPATH"].split(":") == [str(gpu_targets.PLUGIN_DIR), str(tmp_path), "/somewhere"]
    assert env["JAX_PLATFORMS"] == "cpu"
