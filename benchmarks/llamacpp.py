"""llama.cpp as the peer in the CPU benchmarks: built once from source into a cache dir, fed our weights as GGUF.

llama.cpp's source comes from llama-cpp-python's sdist (vendor/llama.cpp), pinned to LLAMA_CPP_PYTHON; the build
goes to $K2JAX_LLAMACPP_CACHE (default ~/.cache/k2jax/llama.cpp-<version>), never into the repo. Checkpoints are
written as float32 HF dirs of per-expert tensors (INT4 experts dequantised) with a `tokenizers` tokenizer.json,
then converted by llama.cpp's own convert_hf_to_gguf.py, told to use its "default" pre-tokenizer (it does not
know our BPE's hash; only text-to-token splitting differs, and the benchmarks send token ids).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

LLAMA_CPP_PYTHON = "0.3.36"
TARGETS = ("llama-server", "llama-bench", "llama-quantize")
CACHE = Path(os.environ.get("K2JAX_LLAMACPP_CACHE",
                            Path.home() / ".cache" / "k2jax" / f"llama.cpp-{LLAMA_CPP_PYTHON}"))
CONVERT = """
import sys
sys.path[:0] = [{src!r}, {src!r} + "/gguf-py"]
sys.argv = ["convert_hf_to_gguf.py", *{args!r}]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""


def source() -> Path:
    """llama.cpp's source tree, fetched (pip download of the pinned sdist) and unpacked on first use."""
    src = CACHE / "src"
    if (src / "CMakeLists.txt").exists():
        return src
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp], check=True)
        with tarfile.open(next(Path(tmp).glob("*.tar.gz"))) as tar:
            tar.extractall(tmp, filter="data")
        shutil.move(str(next(Path(tmp).glob("*/vendor/llama.cpp"))), src)
    return src


def binary(name: str) -> Path:
    """Path of a built llama.cpp program (building them all first if needed)."""
    build = CACHE / "build"
    if not all((build / "bin" / t).exists() for t in TARGETS):
        src = source()
        log = CACHE / "build.log"
        print(f"building llama.cpp (llama-cpp-python {LLAMA_CPP_PYTHON}) into {build}: one time, about 5 minutes "
              f"on 2 cores; compiler output in {log}", file=sys.stderr, flush=True)
        log.write_text("")
        logged(["cmake", "-S", str(src), "-B", str(build), "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release"], log)
        logged(["cmake", "--build", str(build), "--target", *TARGETS, f"-j{os.cpu_count() or 2}"], log)
    return build / "bin" / name


def logged(cmd: list[str], log: Path) -> None:
    """Run a build command with its output appended to `log` (GCC's warnings on llama.cpp run to thousands of
    lines); RuntimeError naming the command and the log's last lines if it fails."""
    with log.open("a") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    if code:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {code}); the end of {log}:\n{tail}")


def byte_tokenizer():
    """The smallest K2 tokenizer llama.cpp loads (a k2jax Tokenizer): the 256 single bytes, one merge (llama.cpp
    refuses a BPE vocabulary without merges) and Kimi's reserved tokens."""
    from k2jax import chat
    from k2jax.tokenizer import Tokenizer, kimi_specials

    tokens = [bytes([b]) for b in range(256)] + [b"  "]
    return Tokenizer(tokens, kimi_specials(len(tokens)), chat.bundled_template())


def write_f32_hf(model, out: Path) -> Path:
    """`model` (a loaded k2jax.Model) as a float32 HF dir that convert_hf_to_gguf reads; returns `out`. A model
    without a tokenizer gets the byte-level one (the converter pads a smaller vocabulary)."""
    import dataclasses

    from checkpoints.hf_writer import write_hf_checkpoint
    from tools.train_bundled import checkpoint_arrays, params_from

    cfg = dataclasses.replace(model.config, quant=None)
    write_hf_checkpoint(out, cfg, params_from(checkpoint_arrays(model), cfg)[1])
    config = out / "config.json"  # convert_hf_to_gguf maps per-expert tensors of model_type deepseek_v3
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "deepseek_v3",
                                  "architectures": ["DeepseekV3ForCausalLM"]}))
    tokenizer = model.tokenizer or byte_tokenizer()
    tokenizer.save(out)  # k2jax-serve reads tiktoken.model; llama.cpp's converter reads tokenizer.json
    tokenizer._backend(True).save(str(out / "tokenizer.json"))
    tok_config = out / "tokenizer_config.json"
    tok_config.write_text(json.dumps({**json.loads(tok_config.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"}))
    return out


def to_gguf(hf_dir: Path, out: Path, outtype: str = "f32") -> Path:
    """Convert an HF dir (as write_f32_hf makes) to GGUF with llama.cpp's converter; returns `out`."""
    script = CONVERT.format(src=str(source()), args=[str(hf_dir), "--outfile", str(out), "--outtype", outtype])
    subprocess.run([sys.executable, "-c", script], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return out


def quantize(src: Path, out: Path, kind: str = "Q4_0") -> Path:
    """llama-quantize `src` to `kind`; returns `out`."""
    subprocess.run([binary("llama-quantize"), src, out, kind], check=True, capture_output=True)
    return out


def bench(gguf: Path, prompt: int = 0, gen: int = 0, batch: int = 1, threads: int = 2) -> float:
    """llama-bench tokens/s for one test: prompt processing of `prompt` tokens or generation of `gen` tokens."""
    args = [binary("llama-bench"), "-m", gguf, "-t", str(threads), "-p", str(prompt), "-n", str(gen), "-o", "json",
            "-r", "3"]
    result = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)
    return float(result[0]["avg_ts"])


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(gguf: Path, parallel: int, context: int, threads: int = 2, timeout_s: float = 300) -> Iterator[str]:
    """llama-server on 127.0.0.1 with `parallel` slots of `context` tokens each; yields its OpenAI base URL."""
    port = free_port()
    args = [binary("llama-server"), "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
            "--parallel", str(parallel), "-c", str(parallel * context), "--cont-batching", "--no-webui"]
    with running(args, port, timeout_s):
        yield f"http://127.0.0.1:{port}/v1"


@contextlib.contextmanager
def running(args: list, port: int, timeout_s: float) -> Iterator[None]:
    """Run a server process until the block ends, its /health on `port` answering 200 before the block starts.

    Its stderr goes to a file, not a pipe: a server logging into a pipe nobody reads blocks once the pipe fills.
    """
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, text=True)
        try:
            wait_ready(f"http://127.0.0.1:{port}/health", proc, log, timeout_s)
            yield
        except Exception as err:
            if proc.poll() is not None:  # the server died: its log says why, the client's error does not
                log.seek(0)
                raise RuntimeError(f"{Path(proc.args[0]).name} exited with {proc.returncode}: "
                                   f"{log.read()[-2000:]}") from err
            raise
        finally:
            proc.terminate()
            proc.wait(60)


def wait_ready(url: str, proc: subprocess.Popen, log, timeout_s: float) -> None:
    """Poll `url` until it answers 200; fail with the end of the process's log if it exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {log.read()[-2000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s")
