"""benchmarks/llamacpp.py: the float32 HF dir given to llama.cpp's converter holds the bundled model's own weights
and tokenizer (checked with transformers and `tokenizers`, not with our loader)."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import k2jax  # noqa: E402
from benchmarks import llamacpp  # noqa: E402
from pallas_kernels import dispatch  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bundled_and_f32(tmp_path_factory):
    model = k2jax.load(Path(k2jax.__file__).parent / "bundled")
    return model, llamacpp.write_f32_hf(model, tmp_path_factory.mktemp("f32"))


def test_f32_dir_has_the_same_logits(bundled_and_f32, rng, monkeypatch):
    """Against k2jax on the float32 XLA path: the native CPU kernel rounds x to int8 for INT4 experts."""
    model, hf_dir = bundled_and_f32
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = rng.integers(0, model.config.vocab_size, 48)
    with torch.no_grad():
        want = hf(torch.tensor(tokens)[None]).logits[0].numpy()
    monkeypatch.setenv(dispatch.ENV_VAR, "xla")
    jax.clear_caches()  # the kernel path is chosen at trace time
    got = np.asarray(model.logits(tokens[None]))[0]
    # float32 on both sides, different summation orders over 8 layers: 1e-4 of the logits' spread
    np.testing.assert_allclose(got, want, atol=1e-4 * float(np.abs(want).max()), rtol=0)


def test_f32_dir_tokenizer_matches(bundled_and_f32):
    model, hf_dir = bundled_and_f32
    fast = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = "Hello, world! 37 * 41 = ?\n  def f(x):\n\treturn x ** 2  # ünïcødé 漢字"
    assert fast.encode(text, add_special_tokens=False) == model.tokenizer.encode(text, allow_special=False)


def test_f32_dir_serves_with_the_same_tokenizer(bundled_and_f32):
    """k2jax-serve is given the same dir as llama.cpp: it must load with the model's own tokenizer."""
    model, hf_dir = bundled_and_f32
    reloaded = k2jax.load(hf_dir)
    assert reloaded.tokenizer is not None
    assert reloaded.tokenizer.tokens == model.tokenizer.tokens
    assert reloaded.tokenizer.bos_id == model.tokenizer.bos_id and reloaded.tokenizer.eos_id == model.tokenizer.eos_id


def test_a_build_step_writes_its_output_to_the_log_and_fails_naming_it(tmp_path, capfd):
    """GCC's thousands of warning lines go to the build log, not the terminal; a failing step raises with its
    command and the log's last lines."""
    log = tmp_path / "build.log"
    llamacpp.logged([sys.executable, "-c", "import sys; print('compiled'); print('warning: x', file=sys.stderr)"],
                    log)
    assert capfd.readouterr() == ("", "")
    assert sorted(log.read_text().splitlines()) == ["compiled", "warning: x"]
    with pytest.raises(RuntimeError, match=r"(?s)exit 3.*build\.log.*error: no such file"):
        llamacpp.logged([sys.executable, "-c", "import sys; print('error: no such file'); sys.exit(3)"], log)
    assert "compiled" in log.read_text()  # appended, not overwritten
