"""Decode and prefill throughput of k2jax against HF transformers (PyTorch eager), same weights, same machine.

Two checkpoints of the same config: float32 weights on both sides; and the native format (routed experts INT4,
compressed-tensors pack-quantized, the rest bf16), which k2jax runs as stored while transformers runs it
decompressed to float32 and, on a CPU with bf16 instructions (AVX-512 BF16, AMX), also in bf16: each row takes
its faster mode and says which. Also k2jax on its plain XLA path
(K2JAX_KERNELS=xla, without the native CPU kernel), each side's memory-bandwidth floor of a batch-1 decode step
(bytes it must read / measured copy bandwidth), and the cold start to first token of `k2jax-generate` with the
bundled model, first run on a new machine (kernel build, empty caches) and with warm caches. Prints markdown tables.

Beside them, llama.cpp (`llama-bench -t <cores>`, built on first use, see benchmarks/llamacpp.py) on GGUF conversions of
the same weights: f32 beside the float32 checkpoint, Q4_0 (`llama-quantize`) beside the native one. Their batch-1
decode rates are taken in turn with k2jax's, TURNS times each, and compared as medians: a VM's memory bandwidth can
move by 1.4-1.8x within a minute, so rates taken minutes apart say little about which side reads faster.

    python benchmarks/decode.py [--preset small] [--new-tokens 64] [--batches 1,8,32] [--formats float32,int4]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import k2jax
from benchmarks import llamacpp
from k2jax.config import Int4Quant, K2Config


Q4_0_BYTES = 18 / 32  # llama.cpp's Q4_0: blocks of 32 weights in 16 bytes of nibbles and one f16 scale
TURNS = 3  # batch-1 decode runs of k2jax and of llama.cpp, taken in turn


def random_checkpoint(cfg: K2Config, path: str):
    """Random k2jax weights (float32) written as an HF checkpoint; returns transformers' model of it."""
    import jax.numpy as jnp
    from flax import nnx

    from checkpoints.hf_writer import write_hf_checkpoint
    from k2jax.model import K2Model

    write_hf_checkpoint(path, cfg, nnx.state(K2Model(cfg, nnx.Rngs(0), jnp.float32)))
    return transformers_model(path)


def transformers_model(path: str):
    """transformers' DeepseekV3ForCausalLM of a float32 HF checkpoint written by k2jax, in float32."""
    from transformers import DeepseekV3ForCausalLM

    config = Path(path) / "config.json"  # transformers maps per-expert tensors only for model_type deepseek_v3
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "deepseek_v3"}))
    return DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def native_checkpoint(cfg: K2Config, path: str) -> None:
    """Random weights in the checkpoint's own format: routed experts INT4 (compressed-tensors), the rest bf16."""
    from checkpoints.hf_writer import write_hf_checkpoint
    from k2jax.synthetic import random_state

    cfg = dataclasses.replace(cfg, quant=Int4Quant())
    write_hf_checkpoint(path, cfg, random_state(cfg))


def decompressed_checkpoint(model, path: str):
    """The native-format model's weights decompressed to float32 (experts dequantized) as an HF checkpoint, and
    transformers' model of it."""
    import jax.numpy as jnp
    from flax import nnx

    from checkpoints.hf_writer import write_hf_checkpoint
    from k2jax.loading import abstract_model
    from pallas_kernels import int4_layout

    cfg = dataclasses.replace(model.config, quant=None)
    stored = {tuple(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(model.state)}
    _, state = abstract_model(cfg, jnp.float32)
    flat = nnx.to_flat_state(state)
    for key, var in flat:
        key = tuple(map(str, key))
        if key[-1] == "weight" and key[:2] == ("moe_layers", "mlp"):
            value = int4_layout.dequantize(stored[(*key[:-1], "packed")], stored[(*key[:-1], "scale")], jnp.float32)
        else:
            value = stored[key].astype(jnp.float32)
        var.set_value(np.asarray(value))
    write_hf_checkpoint(path, cfg, nnx.from_flat_state(flat))
    return transformers_model(path)


def has_bf16_instructions() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX), where PyTorch's bf16 may beat float32."""
    try:
        return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", Path("/proc/cpuinfo").read_text()))
    except OSError:
        return False


def copy_bandwidth() -> float:
    """Bytes per second a large numpy copy moves, counting read and write."""
    src = np.ones(64 * 2**20, np.float32)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(5))
    return 2 * src.nbytes / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def routed_experts(cfg: K2Config, batch: int) -> float:
    """Routed experts a MoE layer reads for `batch` tokens, expected when each token picks its top-k uniformly (a
    random router's picks): every expert that any token picks, E * (1 - (1 - k/E)^batch); k for one token."""
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    return E * (1 - (1 - k / E) ** batch)


def step_bytes(cfg: K2Config, context: int, itemsize: float = 4, expert_itemsize: float | None = None,
               cache_itemsize: float = 4, batch: int = 1) -> int:
    """Bytes one decode step of `batch` rows must read: non-expert weights, the routed experts its tokens pick
    (routed_experts), each row's cache.

    Routed experts take expert_itemsize bytes per parameter (default itemsize; 0.5625 for INT4 with scales).
    """
    H, M = cfg.num_attention_heads, cfg.hidden_size
    q = M * cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim if cfg.q_lora_rank else M * H * cfg.qk_head_dim
    attn = q + M * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * H * (
        cfg.qk_nope_head_dim + cfg.v_head_dim) + H * cfg.v_head_dim * M
    expert = 3 * M * cfg.moe_intermediate_size
    moe = cfg.n_shared_experts * expert + M * cfg.n_routed_experts
    params = (cfg.num_hidden_layers * attn + cfg.first_k_dense_replace * 3 * M * cfg.intermediate_size
              + cfg.num_moe_layers * moe + M * cfg.vocab_size + M)
    routed = cfg.num_moe_layers * routed_experts(cfg, batch) * expert
    cache = batch * cfg.num_hidden_layers * context * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    expert_itemsize = itemsize if expert_itemsize is None else expert_itemsize
    return int(params * itemsize + routed * expert_itemsize + cache * cache_itemsize)


def k2jax_decode(model, prompts: list[list[int]], new_tokens: int, kernels: str = "", runs: int = 1
                 ) -> tuple[float, float]:
    """(decode tokens/s, seconds per step), the median of `runs` timed runs after a warm-up run of the same shapes,
    with K2JAX_KERNELS=kernels."""
    before = os.environ.get("K2JAX_KERNELS", "")
    os.environ["K2JAX_KERNELS"] = kernels
    jax.clear_caches()  # the kernel choice is made at trace time
    model.generate(prompts, max_new_tokens=new_tokens)
    rate = float(np.median([model.generate(prompts, max_new_tokens=new_tokens).stats["decode_tokens_per_s"]
                            for _ in range(runs)]))
    os.environ["K2JAX_KERNELS"] = before
    return rate, len(prompts) / rate


def hf_decode(model, prompts: list[list[int]], new_tokens: int) -> float:
    """Decode tokens/s of HF generate: (time for 1 + n tokens - time for 1 token) over n steps."""
    ids = torch.tensor(prompts)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)
        one = _timed(lambda: model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw))
        many = _timed(lambda: model.generate(ids, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, **kw))
    return len(prompts) * new_tokens / (many - one)


def k2jax_prefill(model, ids: list[list[int]]) -> float:
    """Tokens/s of k2jax's prefill of one prompt, to its first token (after an untimed run)."""
    model.generate(ids, max_new_tokens=1)
    return len(ids[0]) / model.generate(ids, max_new_tokens=1).stats["time_to_first_token_s"]


def hf_prefill(hf, ids: list[list[int]]) -> float:
    """Tokens/s of transformers' forward over one prompt (after an untimed run)."""
    with torch.no_grad():
        hf(torch.tensor(ids))
        return len(ids[0]) / _timed(lambda: hf(torch.tensor(ids)))


def cold_start(caches: str) -> tuple[str, str]:
    """`k2jax-generate` (bundled model, 1 token) launched twice: the first run on a new machine (empty kernel and
    compilation caches under `caches`: the kernel build included), then with both warm. Each as "first token / exit"
    seconds: the first token as the CLI counts it from its process's start (/proc), and the exit as timed here."""
    env = {**os.environ, "K2JAX_COMPILATION_CACHE": f"{caches}/xla", "K2JAX_CPU_KERNEL_CACHE": f"{caches}/kernels"}
    runs = []
    for _ in range(2):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "k2jax.generate", "--max-new-tokens", "1"], env=env,
                              capture_output=True, text=True)
        exit_s = time.perf_counter() - start
        first = re.search(r"first token ([0-9.]+) s after launch", proc.stderr)
        runs.append(f"n/a ({proc.stderr.strip().splitlines()[-1]})" if proc.returncode or first is None
                    else f"{float(first.group(1)):.1f} s / {exit_s:.1f} s")
    return runs[0], runs[1]


def llamacpp_rates(model, kind: str, args: argparse.Namespace, rng: np.random.Generator) -> tuple[float, float, float]:
    """(llama.cpp's batch-1 decode tok/s, its prefill tok/s, k2jax's batch-1 decode tok/s): llama-bench on `model`'s
    weights converted to GGUF `kind` (f32, Q4_0); the two decode rates are medians of TURNS runs each, taken in turn."""
    prompts = rng.integers(2, model.config.vocab_size, (1, args.prompt_len)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        gguf = llamacpp.to_gguf(llamacpp.write_f32_hf(model, Path(tmp) / "hf"), Path(tmp) / "f32.gguf")
        if kind != "f32":
            gguf = llamacpp.quantize(gguf, Path(tmp) / f"{kind}.gguf", kind)
        threads = os.cpu_count() or 1
        k2, llama = [], []
        for _ in range(TURNS):
            k2.append(k2jax_decode(model, prompts, args.new_tokens)[0])
            llama.append(llamacpp.bench(gguf, gen=args.new_tokens, threads=threads))
        return float(np.median(llama)), llamacpp.bench(gguf, prompt=args.prefill, threads=threads), float(np.median(k2))


def llamacpp_lines(kind: str, rates: tuple[float, float, float], floor_s: float, prefill: float,
                   args: argparse.Namespace) -> None:
    """Measure-table lines: llama.cpp's rates, its bytes floor, and k2jax's batch-1 decode and prefill over them."""
    decode, pre, k2 = rates
    print(f"| llama.cpp {kind} GGUF, batch-1 decode: its bytes floor / measured | {floor_s * 1e3:.2f} ms / "
          f"{1e3 / decode:.2f} ms ({1 / decode / floor_s:.2f}x the floor) |")
    print(f"| batch-1 decode, {TURNS} runs each taken in turn (medians): k2jax / llama.cpp {kind} | {k2:.1f} / "
          f"{decode:.1f} tok/s = {k2 / decode:.2f}x |")
    print(f"| prefill 1 x {args.prefill}: k2jax / llama.cpp {kind} | {prefill:.0f} / {pre:.0f} tok/s = "
          f"{prefill / pre:.2f}x |")


def float32_section(cfg: K2Config, args: argparse.Namespace, rng: np.random.Generator, bw: float) -> None:
    """float32 weights on both sides, k2jax also on its XLA path."""
    with tempfile.TemporaryDirectory() as path:
        hf = random_checkpoint(cfg, path)
        model = k2jax.load(path)
    print(f"| {args.preset} config, {args.new_tokens} new tokens after {args.prompt_len}-token prompts, float32, "
          f"{os.cpu_count()} CPU cores |")
    print("| batch | k2jax tok/s | transformers tok/s | ratio | k2jax, XLA path only, tok/s |")
    print("|---|---|---|---|---|")
    step_s = None
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = rng.integers(2, cfg.vocab_size, (batch, args.prompt_len)).tolist()
        rate, seconds = k2jax_decode(model, prompts, args.new_tokens, runs=3)
        xla, _ = k2jax_decode(model, prompts, args.new_tokens, kernels="xla")
        ref = hf_decode(hf, prompts, args.new_tokens)
        step_s = seconds if batch == 1 else step_s
        print(f"| {batch} | {rate:.1f} | {ref:.1f} | {rate / ref:.2f}x | {xla:.1f} |", flush=True)
    floor = step_bytes(cfg, args.prompt_len + args.new_tokens // 2) / bw
    ids = rng.integers(2, cfg.vocab_size, (1, args.prefill)).tolist()
    k2_pre, hf_pre = k2jax_prefill(model, ids), hf_prefill(hf, ids)
    llama = llamacpp_rates(model, "f32", args, rng)
    print()
    print("| measure | value |")
    print("|---|---|")
    if step_s is not None:
        print(f"| batch-1 step: bandwidth floor / k2jax | {floor * 1e3:.2f} ms / {step_s * 1e3:.2f} ms "
              f"= {floor / step_s:.0%} of floor speed ({step_s / floor:.1f}x the floor) |")
    print(f"| prefill 1 x {args.prefill}: k2jax / transformers | {k2_pre:.0f} / {hf_pre:.0f} tok/s "
          f"= {k2_pre / hf_pre:.1f}x |")
    llamacpp_lines("f32", llama, step_bytes(cfg, args.new_tokens // 2, cache_itemsize=2) / bw, k2_pre, args)
    print(flush=True)


def native_section(cfg: K2Config, args: argparse.Namespace, rng: np.random.Generator, bw: float) -> None:
    """The INT4 + bf16 checkpoint: k2jax as stored against transformers on it decompressed (float32, and bf16 where
    the CPU has bf16 instructions: each row takes transformers' faster mode)."""
    with tempfile.TemporaryDirectory() as native, tempfile.TemporaryDirectory() as dense:
        native_checkpoint(cfg, native)
        model = k2jax.load(native)
        hf_modes = {"float32": decompressed_checkpoint(model, dense)}
    if has_bf16_instructions():
        hf_modes["bf16"] = copy.deepcopy(hf_modes["float32"]).to(torch.bfloat16)
    print(f"| {args.preset} config, native format (INT4 experts, bf16 rest): k2jax as stored, transformers "
          f"decompressed, its faster of {' / '.join(hf_modes)} | | | | |")
    print("| batch | k2jax tok/s | transformers tok/s (mode) | ratio | k2jax, XLA path only, tok/s |")
    print("|---|---|---|---|---|")
    step_s = hf_step_s = None
    hf_mode = "float32"
    steps: dict[int, tuple[float, float]] = {}  # batch -> (k2jax seconds a step, transformers tok/s)
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = rng.integers(2, cfg.vocab_size, (batch, args.prompt_len)).tolist()
        rate, seconds = k2jax_decode(model, prompts, args.new_tokens, runs=3)
        xla, _ = k2jax_decode(model, prompts, args.new_tokens, kernels="xla")
        mode, ref = max(((m, hf_decode(hf, prompts, args.new_tokens)) for m, hf in hf_modes.items()),
                        key=lambda mode_rate: mode_rate[1])
        steps[batch] = seconds, ref
        if batch == 1:
            step_s, hf_step_s, hf_mode = seconds, 1 / ref, mode
        print(f"| {batch} | {rate:.1f} | {ref:.1f} ({mode}) | {rate / ref:.2f}x | {xla:.1f} |", flush=True)
    context = args.prompt_len + args.new_tokens // 2
    k2_floor = step_bytes(cfg, context, itemsize=2, expert_itemsize=0.5625) / bw
    hf_itemsize = 2 if hf_mode == "bf16" else 4
    hf_floor = step_bytes(cfg, context, itemsize=hf_itemsize, cache_itemsize=hf_itemsize) / bw
    ids = rng.integers(2, cfg.vocab_size, (1, args.prefill)).tolist()
    k2_pre = k2jax_prefill(model, ids)
    pre_mode, hf_pre = max(((m, hf_prefill(hf, ids)) for m, hf in hf_modes.items()), key=lambda mode_rate: mode_rate[1])
    llama = llamacpp_rates(model, "Q4_0", args, rng)
    print()
    print("| measure | value |")
    print("|---|---|")
    if step_s is not None:
        print(f"| batch-1 step, k2jax: its bytes floor (bf16 + INT4) / measured | {k2_floor * 1e3:.2f} ms / "
              f"{step_s * 1e3:.2f} ms ({step_s / k2_floor:.2f}x the floor) |")
        print(f"| batch-1 step, transformers: its bytes floor ({hf_mode}) / measured | {hf_floor * 1e3:.2f} ms / "
              f"{hf_step_s * 1e3:.2f} ms ({hf_step_s / hf_floor:.2f}x the floor) |")
    for batch, (seconds, ref) in steps.items():
        if batch > 1:
            print(batch_floor_line(cfg, batch, context, seconds, ref, bw))
    print(f"| prefill 1 x {args.prefill}: k2jax / transformers ({pre_mode}) | {k2_pre:.0f} / {hf_pre:.0f} tok/s "
          f"= {k2_pre / hf_pre:.1f}x |")
    q4_floor = step_bytes(cfg, args.new_tokens // 2, itemsize=Q4_0_BYTES, cache_itemsize=2) / bw
    llamacpp_lines("Q4_0", llama, q4_floor, k2_pre, args)
    print(flush=True)


def batch_floor_line(cfg: K2Config, batch: int, context: int, seconds: float, ref: float, bw: float) -> str:
    """A measure-table line: k2jax's native step of `batch` rows against its bytes floor (the experts its tokens
    pick, routed_experts), and the rate at that floor as a multiple of transformers' measured `ref` tok/s: no
    step that reads its weights once can beat that multiple on this machine."""
    floor = step_bytes(cfg, context, itemsize=2, expert_itemsize=0.5625, batch=batch) / bw
    return (f"| batch-{batch} step, k2jax: its bytes floor ({routed_experts(cfg, batch):.0f} of "
            f"{cfg.n_routed_experts} experts a layer) / measured | {floor * 1e3:.2f} ms / {seconds * 1e3:.2f} ms "
            f"({seconds / floor:.2f}x the floor); at the floor {batch / floor:.0f} tok/s = "
            f"{batch / floor / ref:.1f}x transformers |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prefill", type=int, default=1024)
    ap.add_argument("--formats", default="float32,int4", help="checkpoints to run: float32 and/or int4 (native)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = dataclasses.replace(k2jax.preset(args.preset), quant=None)
    rng = np.random.default_rng(0)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    bw = copy_bandwidth()
    print(f"copy bandwidth (read + write): {bw / 1e9:.1f} GB/s\n")
    formats = args.formats.split(",")
    if "float32" in formats:
        float32_section(cfg, args, rng, bw)
    if "int4" in formats:
        native_section(cfg, args, rng, bw)
    with tempfile.TemporaryDirectory() as caches:
        first, warm = cold_start(caches)
    print(f"| cold start of `k2jax-generate` (bundled model), first token / exit: first run on a new machine "
          f"(kernel build, empty caches) | {first} |")
    print(f"| same, warm caches | {warm} |")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
