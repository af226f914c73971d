"""k2jax-convert: HF -> orbax (+ config, tokenizer); loading the orbax dir gives the same model."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import k2jax
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
