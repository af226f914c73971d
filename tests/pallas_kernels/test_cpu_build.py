"""The native CPU kernels' library: one build per key over every source, cached."""

import shutil

import pytest

from pallas_kernels import cpu_build

pytestmark = pytest.mark.skipif(not cpu_build.available(), reason="no C++ compiler: the native kernels cannot be built")


def test_build_is_cached_by_key(tmp_path, monkeypatch):
    """A second build with the same key reuses the library; another cache directory builds anew."""
    first = cpu_build.build()
    assert cpu_build.build() == first and first.exists()
    monkeypatch.setenv("K2JAX_CPU_KERNEL_CACHE", str(tmp_path))
    second = cpu_build.build()
    assert second.parent == tmp_path and second.name == first.name


@pytest.mark.parametrize("index", range(len(cpu_build.SOURCES) + len(cpu_build.HEADERS)))
def test_build_key_covers_every_source(tmp_path, monkeypatch, index):
    """Editing any one kernel source or shared header changes the key (so the library is rebuilt)."""
    files = [*cpu_build.SOURCES, *cpu_build.HEADERS]
    before = cpu_build._build_key("c++")
    copy = tmp_path / files[index].name
    shutil.copy(files[index], copy)
    copy.write_text(copy.read_text() + "\n// edited\n")
    files[index] = copy
    monkeypatch.setattr(cpu_build, "SOURCES", tuple(files[:len(cpu_build.SOURCES)]))
    monkeypatch.setattr(cpu_build, "HEADERS", tuple(files[len(cpu_build.SOURCES):]))
    assert cpu_build._build_key("c++") != before


def test_a_source_that_fails_to_compile_names_itself_and_leaves_no_library(tmp_path, monkeypatch):
    """The sources compile in parallel; one failing raises with its command and the compiler's message, after the
    others have finished, and nothing is cached."""
    bad = tmp_path / "broken_kernel.cc"
    bad.write_text("int broken( { return 0; }\n")
    monkeypatch.setattr(cpu_build, "SOURCES", (cpu_build.SOURCES[1], bad))
    monkeypatch.setenv("K2JAX_CPU_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match=r"broken_kernel\.cc(.|\n)*error") as err:
        cpu_build.build()
    assert "-c" in str(err.value).split("\n")[0]
    assert list((tmp_path / "cache").iterdir()) == []
