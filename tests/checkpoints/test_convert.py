"""k2jax-convert: HF -> orbax (+ config, tokenizer); loading the orbax dir gives the same model."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import k2jax
from checkpoints import orbax_io
from checkpoints.safetensors_io import CheckpointError
from k2jax.config import K2Config
from k2jax.convert import main


def test_convert_then_load_gives_identical_logits(int4_checkpoint, tmp_path, rng):
    source = Path(shutil.copytree(int4_checkpoint().path, tmp_path / "hf"))
    (source / "chat_template.jinja").write_text("{{ messages }}")
    out = tmp_path / "orbax"
    assert main([str(source), str(out)]) == 0
    assert (out / "params").is_dir() and K2Config.from_json(out) == K2Config.from_json(source)
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
    ids = rng.integers(0, 256, (2, 9))
    np.testing.assert_array_equal(k2jax.load(out).logits(ids), k2jax.load(source).logits(ids))


def test_an_orbax_checkpoint_saved_before_kv_a_was_padded_loads_the_same_model(int4_checkpoint, tmp_path, rng):
    """kv_a's columns past c_kv | k_pe pad it to the cache's lanes; checkpoints saved without them still load."""
    source = int4_checkpoint().path
    model = k2jax.load(source)
    cfg, state = model.config, model.state
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert width < cfg.cache_lanes
    for stack in ("dense_layers", "moe_layers"):
        kv_a = state[stack]["attn"]["kv_a"]
        np.testing.assert_array_equal(np.asarray(kv_a[...])[..., width:], 0)
        kv_a.set_value(kv_a[...][..., :width])
    orbax_io.save_orbax(tmp_path / "old", cfg, state)
    ids = rng.integers(0, 256, (2, 9))
    np.testing.assert_array_equal(k2jax.load(tmp_path / "old").logits(ids), k2jax.load(source).logits(ids))


def test_convert_refuses_a_non_empty_output_dir(int4_checkpoint, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main([str(int4_checkpoint().path), str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_convert_reports_a_bad_checkpoint(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert f"{tmp_path}: no model.safetensors.index.json" in capsys.readouterr().err


def test_help_exits_cleanly():
    with pytest.raises(SystemExit) as caught:
        main(["--help"])
    assert caught.value.code == 0


@pytest.fixture(scope="module")
def bundled_orbax(tmp_path_factory) -> Path:
    """The bundled model converted to orbax, to damage copies of."""
    out = tmp_path_factory.mktemp("orbax") / "bundled"
    assert main([str(Path(k2jax.__file__).parent / "bundled"), str(out)]) == 0
    return out


def largest_data_file(params: Path) -> Path:
    return max((f for f in params.rglob("*") if f.is_file() and f.parent.name == "d"), key=lambda f: f.stat().st_size)


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


DAMAGE = {  # name -> (what is done to params/, words the error holds)
    "empty params": (lambda p: [shutil.rmtree(p), p.mkdir()], "no _METADATA"),
    "truncated data file": (lambda p: truncate(largest_data_file(p)), "cannot read the array data"),
    "deleted data file": (lambda p: largest_data_file(p).unlink(), "cannot read the array data"),
    "half the files gone": (lambda p: [f.unlink() for f in sorted(p.rglob("*"))[::2] if f.is_file()], "params"),
    "damaged _METADATA": (lambda p: (p / "_METADATA").write_text("{nope"), "_METADATA: damaged"),
    "no manifest": (lambda p: (p / "manifest.ocdbt").unlink(), "no manifest.ocdbt"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_orbax_checkpoint_is_one_named_error(bundled_orbax, tmp_path, damage):
    ckpt = Path(shutil.copytree(bundled_orbax, tmp_path / "ckpt"))
    harm, words = DAMAGE[damage]
    harm(ckpt / "params")
    with pytest.raises(CheckpointError) as caught:
        k2jax.load(ckpt)
    message = str(caught.value)
    assert message.startswith(str(ckpt / "params")) and words in message and "\n" not in message


def test_a_missing_commit_marker_is_a_warning(bundled_orbax, tmp_path, caplog):
    ckpt = Path(shutil.copytree(bundled_orbax, tmp_path / "ckpt"))
    (ckpt / "params" / "commit_success.txt").unlink()
    with caplog.at_level("WARNING", logger="checkpoints.orbax_io"):
        model = k2jax.load(ckpt)
    assert model.config == K2Config.from_json(ckpt)
    assert any("commit_success.txt" in r.getMessage() and "may not have finished" in r.getMessage()
               for r in caplog.records)



def test_abandoned_read_noise_is_dropped_from_before_the_first_read(tmp_path, monkeypatch):
    """Orbax's other reads can hit its closed event loop before the failed read reaches us: the filter must be in
    place when a read starts, and must let every other unraisable exception through."""
    passed = []
    monkeypatch.setattr(sys, "unraisablehook", passed.append)
    hook = orbax_io._read(tmp_path, "array data", lambda: sys.unraisablehook)
    noise = [RuntimeError("Event loop is closed"),
             ValueError('FAILED_PRECONDITION: Error reading "a/0.0" in OCDBT database at local file "x"'),
             Exception("Encountered error while reading array index: (slice(0, 3, 1),)")]
    other = [RuntimeError("Event loop is closed soon"), ValueError("something else")]
    for error in noise + other:
        hook(SimpleNamespace(object=None, exc_value=error))
    assert [u.exc_value for u in passed] == other
