"""Train the bundled model: a BPE on the offline corpus, then a small Kimi K2 with INT4 QAT of its routed experts.

Three runs share one data order and one learning-rate schedule: a float32 trunk of `--trunk-steps`, then two
branches of `--branch-steps` from it, one plain (the "bf16 model", evaluated with its weights in bf16) and
one with fake-quantized experts (group-32 INT4, straight-through estimator). Held-out perplexity is
reported for the bf16 model, INT4 post-training quantization of it, and the QAT model; the QAT model
(trained on for `--extend-steps` when non-zero) is written in Kimi K2's HF format (compressed-tensors INT4
experts) to k2jax/bundled/ with its tokenizer. With `--init DIR` the runs start from a K2 checkpoint (its
tokenizer, its weights with the experts dequantised) instead of a new BPE and a fresh model.

The round-3 model is made in three rounds (each run checkpoints every `--save-every` steps and resumes). The
third adds echo drills (copy tasks in the chat format, see make_corpus.echo_drill) and less code, then extends
the QAT model on a code-heavier mix and exports it:

    python -m tools.train_bundled --chats 6000 --peak-lr 3e-3 --trunk-steps 520 --branch-steps 180 \
        --extend-steps 700 --work build/bundled/v1 --out build/bundled/v1/model
    python -m tools.train_bundled --init build/bundled/v1/model --work build/bundled/v2 --out build/bundled/v2/model
    python -m tools.train_bundled --init build/bundled/v2/model --work build/bundled/v3 --stage train \
        --echoes 60000 --code-chars 1500000 --seq-len 384 --batch 6 --trunk-steps 2200 --branch-steps 150 --peak-lr 3e-3
    python -m tools.train_bundled --work build/bundled/v3 --stage extend --extend-steps 300 --echoes 20000 \
        --seq-len 384 --batch 6 --trunk-steps 2200 --branch-steps 150 --peak-lr 1e-3
    python -m tools.train_bundled --work build/bundled/v3 --stage export --extend-steps 300 --seq-len 384

A fourth round, not shipped (benchmarks/RESULTS.md, "Tool calls", says why), started from the round-3 model and
trained 480 steps on conversations whose tools are drawn at random (make_corpus.random_tool_chat), half of each
batch's windows starting at a document's start so that a window holds a whole conversation.

The shipped model comes from two more rounds on such conversations, from the round-3 model (issue 19 item 4).
Round 5 (make_corpus with made-up tool names, parameter names still from the families' pools; 38 min):

    python -m tools.train_bundled --init k2jax/bundled --work build/bundled/v5 --stage train \
        --tool-chats 12000 --echoes 4000 --code-chars 4000000 --seq-len 512 --batch 6 --aligned 0.5 \
        --trunk-steps 1600 --branch-steps 40 --peak-lr 1e-3 --save-every 50
    python -m tools.train_bundled --work build/bundled/v5 --stage export --seq-len 384 --out build/bundled/v5/model

Round 6 (made-up parameter names too; 39 min), then 150 steps on a code-heavier mix
(3 min), which won back code and chat perplexity without losing tool calls:

    python -m tools.train_bundled --init build/bundled/v5/model --work build/bundled/v6 --stage train \
        --tool-chats 20000 --echoes 4000 --code-chars 3000000 --seq-len 512 --batch 6 --aligned 0.5 \
        --trunk-steps 1600 --branch-steps 40 --peak-lr 1.5e-3 --save-every 100
    python -m tools.train_bundled --work build/bundled/v6 --stage extend --extend-steps 150 --tool-chats 4000 \
        --echoes 1000 --code-chars 6000000 --seq-len 512 --batch 6 --aligned 0.5 --trunk-steps 1600 \
        --branch-steps 40 --peak-lr 3e-4
    python -m tools.train_bundled --work build/bundled/v6 --stage export --extend-steps 150 --seq-len 384

An extension of 250 steps at 1e-3 with twice the tool chats was tried first and dropped: it lost 6 points of exact
tool arguments and no code.

Round 7 (the reasoning names a tool's description before its name, 70% of tool names made up, descriptions composed
from parts; 35 min, then 150 steps on code, 4 min):

    python -m tools.train_bundled --init k2jax/bundled --work build/bundled/v7 --stage train \
        --tool-chats 20000 --echoes 4000 --code-chars 3000000 --seq-len 512 --batch 6 --aligned 0.5 \
        --trunk-steps 1400 --branch-steps 40 --peak-lr 1.5e-3 --save-every 100
    python -m tools.train_bundled --work build/bundled/v7 --stage extend --extend-steps 150 --tool-chats 4000 \
        --echoes 1000 --code-chars 6000000 --seq-len 512 --batch 6 --aligned 0.5 --trunk-steps 1400 \
        --branch-steps 40 --peak-lr 3e-4
    python -m tools.train_bundled --work build/bundled/v7 --stage export --extend-steps 150 --seq-len 384

A round 8 from it whose reasoning gave the description alone (the name left to the call's header) was dropped: 67.8%
exact arguments and 1 of 38 no-tool requests calling a tool (benchmarks/RESULTS.md, "Tool calls").

Round 9 (make_corpus as it is now: the reasoning quotes the tool's description and name as the tool list renders
them), round 7's commands from round 7's model with --work build/bundled/v9 and, on the export, --out
build/bundled/v9/model (33 min + 4 min), was not shipped on its own. The shipped model is round 10, from round 9's,
every batch row starting at a document's start (`--aligned 1.0`: a window that starts inside a tool chat may cut
off its tool list and earlier turns, and there the model can only guess names; 25 min, then 150 steps on code,
4 min):

    python -m tools.train_bundled --init build/bundled/v9/model --work build/bundled/v10 --stage train \
        --tool-chats 20000 --echoes 4000 --code-chars 3000000 --seq-len 512 --batch 6 --aligned 1.0 \
        --trunk-steps 1000 --branch-steps 40 --peak-lr 1e-3 --save-every 100
    python -m tools.train_bundled --work build/bundled/v10 --stage extend --extend-steps 150 --tool-chats 4000 \
        --echoes 1000 --code-chars 6000000 --seq-len 512 --batch 6 --aligned 1.0 --trunk-steps 1000 \
        --branch-steps 40 --peak-lr 3e-4
    python -m tools.train_bundled --work build/bundled/v10 --stage export --extend-steps 150 --seq-len 384

Two later rounds from the shipped model were not shipped (benchmarks/RESULTS.md, "Tool calls"): round 11, 1,200 steps
at 7e-4 over the same windows again, and round 12, round 10's three commands from `--init k2jax/bundled` with
`--windows 1` (new windows over the same corpus and held-out split) and `--out build/bundled/v11/model` on the export.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

import k2jax.model
from checkpoints.hf_writer import write_hf_checkpoint
from k2jax import chat
from k2jax.config import Int4Quant, K2Config
from k2jax.loading import abstract_model
from k2jax.model import K2Model, forward
from k2jax.tokenizer import KIMI_PATTERN, Tokenizer, byte_to_unicode, kimi_specials
from pallas_kernels import int4_layout
from tools import evaluate_bundled, make_corpus

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "k2jax" / "bundled"
METRICS_FILE = "training_metrics.json"
TEST_WINDOWS = 4
TEST_TASKS = 16
CHAT_MARKERS = ("<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>", "<|im_end|>", chat.THINK_BEGIN,
                chat.THINK_END, chat.SECTION_BEGIN, chat.SECTION_END, chat.CALL_BEGIN, chat.ARGUMENT_BEGIN,
                chat.CALL_END)
EXPERT_PROJS = ("gate", "up", "down")

Params = nnx.State


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Optimisation hyper-parameters shared by all runs."""

    seq_len: int = 512
    batch: int = 4
    peak_lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    trunk_steps: int = 1300
    branch_steps: int = 250
    extend_steps: int = 0
    seed: int = 0
    aligned: float = 0.0
    windows: int = 0  # which draw of training windows: a later round on the same corpus draws others

    @property
    def total_steps(self) -> int:
        return self.trunk_steps + self.branch_steps


def train_bpe(texts: list[str], n_base: int) -> list[bytes]:
    """Byte-level BPE ranks (token bytes in merge order) learned with Kimi's pre-tokenizer; chat markers stay whole."""
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(KIMI_PATTERN), "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_base + len(CHAT_MARKERS), special_tokens=list(CHAT_MARKERS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    byte_of = {c: b for b, c in byte_to_unicode().items()}
    ranked = sorted((i, s) for s, i in bpe.get_vocab().items() if s not in CHAT_MARKERS)
    return [bytes(byte_of[c] for c in s) for _, s in ranked]


def make_tokenizer(texts: list[str], n_base: int) -> Tokenizer:
    """Kimi-format tokenizer: BPE ranks from the corpus plus Kimi's 256 reserved tokens, K2 chat template."""
    tokens = train_bpe(texts, n_base)
    return Tokenizer(tokens, kimi_specials(len(tokens)), chat.bundled_template())


def bundled_config(tokenizer: Tokenizer, quant: Int4Quant | None) -> K2Config:
    """Kimi K2's architecture at toy width: MLA with q_lora, YaRN, one dense layer, 3 MoE layers of 16 experts."""
    return K2Config(
        vocab_size=tokenizer.vocab_size, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, num_experts_per_tok=4,
        n_shared_experts=1, max_position_embeddings=4096, original_max_position_embeddings=512, rope_factor=8.0,
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, quant=quant)


def document_starts(stream: np.ndarray, eos_id: int, seq_len: int) -> np.ndarray:
    """Offsets of the stream's documents (0 and each position after [EOS]) that leave room for a whole window."""
    starts = np.concatenate([[0], np.flatnonzero(stream == eos_id) + 1])
    return starts[starts < len(stream) - seq_len - 1]


def batch_at(stream: np.ndarray, step: int, settings: TrainSettings, doc_starts: np.ndarray) -> np.ndarray:
    """Training windows [B, T+1] for `step`, drawn from (seed, step), or (seed, windows, step) for a later draw, so
    every branch sees the same: the first `aligned` share of rows start at a document's start (whole tool chats),
    the others at random offsets."""
    rng = np.random.default_rng((settings.seed, *([settings.windows] if settings.windows else []), step))
    starts = rng.integers(0, len(stream) - settings.seq_len - 1, settings.batch)
    n_aligned = round(settings.aligned * settings.batch)
    if n_aligned:
        starts[:n_aligned] = rng.choice(doc_starts, n_aligned)
    return np.stack([stream[s:s + settings.seq_len + 1] for s in starts])


def fake_quant(w: jax.Array) -> jax.Array:
    """INT4 group-32 quantize-dequantize of [..., K, N] weights with a straight-through gradient."""
    return w + jax.lax.stop_gradient(int4_layout.dequantize(*int4_layout.quantize(w), w.dtype) - w)


def expert_key(proj: str) -> tuple[str, ...]:
    """Flat-state path of one routed-expert projection's dense weight [L, E, K, N]."""
    return ("moe_layers", "mlp", proj, "weight")


def map_experts(params: Params, fn: Callable[[jax.Array], jax.Array]) -> Params:
    """Params with `fn` applied to each routed-expert weight."""
    flat = dict(nnx.to_flat_state(params))
    for proj in EXPERT_PROJS:
        flat[expert_key(proj)] = flat[expert_key(proj)].replace(fn(flat[expert_key(proj)][...]))
    return nnx.from_flat_state(flat)


def as_stored(params: Params, int4: bool) -> Params:
    """Params with the checkpoint's precision: bf16, the router bias float32, routed experts INT4 when `int4`."""
    flat = dict(nnx.to_flat_state(params))
    experts = {expert_key(proj) for proj in EXPERT_PROJS} if int4 else set()
    for key, var in flat.items():
        if key[-1] != "router_bias" and key not in experts:
            flat[key] = var.replace(var[...].astype(jnp.bfloat16).astype(jnp.float32))
    return map_experts(nnx.from_flat_state(flat), fake_quant) if int4 else nnx.from_flat_state(flat)


def init_params(cfg: K2Config, seed: int) -> tuple[nnx.GraphDef, Params]:
    """A fresh float32 model (dense experts) split into graph and parameters."""
    return nnx.split(K2Model(cfg, nnx.Rngs(seed), jnp.float32))


def loss_fn(params: Params, graphdef: nnx.GraphDef, windows: jax.Array, cfg: K2Config, qat: bool) -> jax.Array:
    """Mean next-token cross-entropy of windows [B, T+1]; experts fake-quantized when `qat`."""
    params = map_experts(params, fake_quant) if qat else params
    tokens, targets = windows[:, :-1], windows[:, 1:]
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits, _ = forward(nnx.merge(graphdef, params), tokens, pos, None, cfg, jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def optimizer(settings: TrainSettings, steps: int | None = None) -> optax.GradientTransformation:
    """AdamW with warmup and cosine decay to 10% over `steps` (all runs' steps by default), clipped at norm 1."""
    steps = steps or settings.total_steps
    warmup = min(settings.warmup, steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(0.0, settings.peak_lr, warmup, steps, settings.peak_lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=settings.weight_decay))


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "qat", "opt"), donate_argnames=("params", "opt_state"))
def train_step(params: Params, opt_state: Any, windows: jax.Array, graphdef: nnx.GraphDef, cfg: K2Config, qat: bool,
               opt: optax.GradientTransformation) -> tuple[Params, Any, jax.Array]:
    """One AdamW step on a batch of windows."""
    loss, grads = jax.value_and_grad(loss_fn)(params, graphdef, windows, cfg, qat)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"))
def eval_loss(params: Params, windows: jax.Array, graphdef: nnx.GraphDef, cfg: K2Config) -> jax.Array:
    """Mean next-token cross-entropy of windows [B, T+1] with the parameters as given."""
    return loss_fn(params, graphdef, windows, cfg, qat=False)


def tiled_grouped_matmul(x_XK: jax.Array, w_EKN: jax.Array, group_sizes_E: jax.Array, tile: int = 64) -> jax.Array:
    """ragged_dot's result, computed as tiles of rows that each belong to one expert (several times faster on CPU)."""
    X, E = x_XK.shape[0], w_EKN.shape[0]
    padded_E = -(-group_sizes_E // tile) * tile
    start_E, padded_start_E = jnp.cumsum(group_sizes_E) - group_sizes_E, jnp.cumsum(padded_E) - padded_E
    n_tiles = -(-X // tile) + E
    expert_X = jnp.repeat(jnp.arange(E), group_sizes_E, total_repeat_length=X)
    dest_X = padded_start_E[expert_X] + jnp.arange(X) - start_E[expert_X]
    x_TtK = jnp.zeros((n_tiles * tile, x_XK.shape[1]), x_XK.dtype).at[dest_X].set(x_XK).reshape(n_tiles, tile, -1)
    expert_T = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded_E), jnp.arange(n_tiles) * tile, side="right"), E - 1)
    y_TtN = jnp.einsum("tik,tkn->tin", x_TtK, w_EKN[expert_T], preferred_element_type=jnp.float32)
    return y_TtN.reshape(n_tiles * tile, -1)[dest_X].astype(x_XK.dtype)


def tiled_expert_matmul(p: Any, layer: jax.Array, x_XK: jax.Array, sizes_E: jax.Array) -> jax.Array:
    """Drop-in for k2jax.model.expert_matmul on dense experts, used only while tracing training programs."""
    return tiled_grouped_matmul(x_XK, p.weight[...][layer].astype(x_XK.dtype), sizes_E)


def save_run_state(path: Path, step: int, params: Params, opt_state: Any) -> None:
    """A run's parameters and optimizer state after `step` steps as plain arrays (.npz), written atomically."""
    tmp = path.with_suffix(".tmp.npz")
    leaves = jax.tree.leaves((params, opt_state))
    np.savez(tmp, step=step, **{f"leaf_{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)})
    tmp.replace(path)


def resume(path: Path, steps: range, params: Params, opt_state: Any) -> tuple[range, Params, Any]:
    """The steps still to run and the state to run them from: a saved run state at `path` when there is one.

    The arrays fill the structure of the given (params, opt_state), which the same run rebuilds identically.
    """
    if not path.exists():
        return steps, params, opt_state
    saved = np.load(path, allow_pickle=False)
    treedef = jax.tree.structure((params, opt_state))
    leaves = [jnp.asarray(saved[f"leaf_{i}"]) for i in range(treedef.num_leaves)]
    params, opt_state = jax.tree.unflatten(treedef, leaves)
    return range(int(saved["step"]), steps.stop), params, opt_state


def run(params: Params, opt_state: Any, stream: np.ndarray, steps: range, graphdef: nnx.GraphDef, cfg: K2Config,
        settings: TrainSettings, qat: bool, log: Callable[[str], None], state_file: Path, save_every: int,
        opt: optax.GradientTransformation | None = None) -> tuple[Params, Any]:
    """Train over `steps` (of the shared schedule unless `opt` is given), logging the running loss.

    The run state is saved to `state_file` every `save_every` steps and at the end; a saved state is resumed.
    """
    opt = opt or optimizer(settings)
    steps, params, opt_state = resume(state_file, steps, params, opt_state)
    start, losses = time.perf_counter(), []
    doc_starts = document_starts(stream, cfg.eos_token_id, settings.seq_len)
    for step in steps:
        windows = jnp.asarray(batch_at(stream, step, settings, doc_starts))
        params, opt_state, loss = train_step(params, opt_state, windows, graphdef, cfg, qat, opt)
        losses.append(loss)
        if (step + 1) % 50 == 0 or step + 1 == steps.stop:
            log(f"{'qat' if qat else 'fp32'} step {step + 1}/{steps.stop} "
                f"loss {float(np.mean(jax.device_get(losses[-50:]))):.3f} ({time.perf_counter() - start:.0f} s)")
        if (step + 1) % save_every == 0 or step + 1 == steps.stop:
            save_run_state(state_file, step + 1, params, opt_state)
    return params, opt_state


def copy_tree(tree: Any) -> Any:
    """A device copy (train_step donates its inputs)."""
    return jax.tree.map(jnp.copy, tree)


def heldout_ppl(params: Params, graphdef: nnx.GraphDef, cfg: K2Config, windows: np.ndarray, batch: int = 8) -> float:
    """exp(mean cross-entropy) over held-out windows, in batches."""
    losses = [float(eval_loss(params, jnp.asarray(windows[i:i + batch]), graphdef, cfg)) for i in range(0, len(windows), batch)]
    return math.exp(float(np.mean(losses)))


def settings_from(args: argparse.Namespace) -> TrainSettings:
    """TrainSettings from the command line."""
    return TrainSettings(seq_len=args.seq_len, batch=args.batch, peak_lr=args.peak_lr, trunk_steps=args.trunk_steps,
                         branch_steps=args.branch_steps, extend_steps=args.extend_steps, seed=args.seed,
                         aligned=args.aligned, windows=args.windows)


def streams(corpus: make_corpus.Corpus, tokenizer: Tokenizer, settings: TrainSettings,
            n_windows: int) -> tuple[np.ndarray, np.ndarray]:
    """The training token stream and the held-out evaluation windows."""
    heldout = evaluate_bundled.token_stream(tokenizer, corpus.heldout)
    return (evaluate_bundled.token_stream(tokenizer, corpus.train),
            evaluate_bundled.eval_windows(heldout, settings.seq_len, n_windows))


def save_params(params: Params, path: Path) -> None:
    """Parameters as an .npz keyed by flat-state path."""
    np.savez(path, **{"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(params)})


def params_from(arrays: Any, cfg: K2Config) -> tuple[nnx.GraphDef, Params]:
    """Float32 training parameters (dense experts) from arrays keyed by flat-state path, with their graph."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: K2Model(cfg, nnx.Rngs(0), jnp.float32)))
    flat = nnx.to_flat_state(params)
    for key, var in flat:
        var.set_value(jnp.asarray(arrays["/".join(map(str, key))], jnp.float32))
    return graphdef, nnx.from_flat_state(flat)


def load_params(path: Path, cfg: K2Config) -> tuple[nnx.GraphDef, Params]:
    """Parameters saved by save_params, with their graph."""
    return params_from(np.load(path), cfg)


def checkpoint_arrays(model: k2jax.Model) -> dict[str, np.ndarray]:
    """A loaded model's parameters keyed by training flat-state path, INT4 experts dequantised to dense weights."""
    flat = {"/".join(map(str, key)): np.asarray(var.get_value()) for key, var in nnx.to_flat_state(model.state)}
    arrays = {name: a for name, a in flat.items() if not name.endswith(("/packed", "/scale"))}
    for name in (n for n in flat if n.endswith("/packed")):
        base = name.rsplit("/", 1)[0]
        arrays[base + "/weight"] = np.asarray(int4_layout.dequantize(flat[name], flat[base + "/scale"], jnp.float32))
    return arrays


def starting_point(args: argparse.Namespace, corpus: make_corpus.Corpus,
                   log: Callable[[str], None]) -> tuple[Tokenizer, nnx.GraphDef, Params]:
    """The tokenizer and float32 parameters to train from: those of --init, else a new BPE and a fresh model."""
    if args.init is None:
        tokenizer = make_tokenizer(corpus.train, args.base_vocab)
        return (tokenizer, *init_params(bundled_config(tokenizer, quant=None), args.seed))
    model = k2jax.load(args.init)
    log(f"starting from {args.init}")
    return model.tokenizer, *params_from(checkpoint_arrays(model), bundled_config(model.tokenizer, quant=None))


def corpus_of(args: argparse.Namespace) -> make_corpus.Corpus:
    """The corpus the command line asks for."""
    return make_corpus.make_corpus(args.seed, code_chars=args.code_chars, n_chats=args.chats, n_echoes=args.echoes,
                                   n_tool_chats=args.tool_chats)


def corpus_settings(args: argparse.Namespace) -> dict[str, int]:
    """The command line's corpus sizes, as the metrics record them."""
    return {"chats": args.chats, "echoes": args.echoes, "tool_chats": args.tool_chats, "code_chars": args.code_chars}


def train(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Corpus, tokenizer, the three runs and their held-out perplexities; saves tokenizer and QAT params in --work."""
    settings = settings_from(args)
    corpus = corpus_of(args)
    log(f"corpus: {len(corpus.train)} train docs, {len(corpus.heldout)} held-out docs")
    tokenizer, graphdef, params = starting_point(args, corpus, log)
    tokenizer.save(args.work / "tokenizer")
    stream, heldout = streams(corpus, tokenizer, settings, args.eval_windows)
    log(f"tokenizer: {tokenizer.vocab_size} ids; {len(stream) / 1e6:.2f} M train tokens, {heldout.shape} held-out")
    cfg = bundled_config(tokenizer, quant=None)
    opt_state = optimizer(settings).init(params)
    start = time.perf_counter()
    with mock.patch.object(k2jax.model, "expert_matmul", tiled_expert_matmul):
        params, opt_state = run(params, opt_state, stream, range(settings.trunk_steps), graphdef, cfg, settings,
                                False, log, args.work / "trunk_state.npz", args.save_every)
        branch = range(settings.trunk_steps, settings.total_steps)
        qat, _ = run(copy_tree(params), copy_tree(opt_state), stream, branch, graphdef, cfg, settings, True, log,
                     args.work / "qat_state.npz", args.save_every)
        plain, _ = run(params, opt_state, stream, branch, graphdef, cfg, settings, False, log,
                       args.work / "plain_state.npz", args.save_every)
        train_seconds = time.perf_counter() - start
        ppl = {"bf16": heldout_ppl(as_stored(plain, int4=False), graphdef, cfg, heldout),
               "int4_ptq": heldout_ppl(as_stored(plain, int4=True), graphdef, cfg, heldout),
               "int4_qat": heldout_ppl(as_stored(qat, int4=True), graphdef, cfg, heldout),
               "qat_bf16_experts": heldout_ppl(as_stored(qat, int4=False), graphdef, cfg, heldout)}
    log("held-out perplexity: " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()))
    save_params(qat, args.work / "qat_params.npz")
    return {"settings": dataclasses.asdict(settings), "init": None if args.init is None else str(args.init),
            **corpus_settings(args), "train_tokens": len(stream), "train_seconds": train_seconds,
            "heldout_windows": list(heldout.shape), "heldout_perplexity": ppl}


def extend(args: argparse.Namespace, metrics: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """Train the QAT model on for --extend-steps (fresh warmup-cosine schedule, new batches): the final params.

    The corpus is the one this command line asks for, which may differ from the train stage's.
    """
    settings = settings_from(args)
    tokenizer = Tokenizer.from_dir(args.work / "tokenizer")
    stream, heldout = streams(corpus_of(args), tokenizer, settings, args.eval_windows)
    cfg = bundled_config(tokenizer, quant=None)
    graphdef, params = load_params(args.work / "qat_params.npz", cfg)
    opt = optimizer(settings, settings.extend_steps)
    steps = range(settings.total_steps, settings.total_steps + settings.extend_steps)
    with mock.patch.object(k2jax.model, "expert_matmul", tiled_expert_matmul):
        params, _ = run(params, opt.init(params), stream, steps, graphdef, cfg, settings, True, log,
                        args.work / "extend_state.npz", args.save_every, opt)
        ppl = heldout_ppl(as_stored(params, int4=True), graphdef, cfg, heldout)
    log(f"extended QAT model: held-out perplexity {ppl:.3f}")
    save_params(params, args.work / "final_params.npz")
    return {**metrics, "extended_qat": {"steps": settings.extend_steps, "peak_lr": settings.peak_lr,
                                         **corpus_settings(args), "heldout_perplexity_int4": ppl}}


def int4_state(params: dict[str, np.ndarray], cfg: K2Config) -> nnx.State:
    """The checkpoint's state: parameters in bf16 (router bias float32), routed experts quantized to INT4."""
    _, abstract = abstract_model(cfg)
    flat = nnx.to_flat_state(abstract)
    for key, var in flat:
        name = "/".join(map(str, key))
        if key[-1] in ("packed", "scale"):
            packed, scale = int4_layout.quantize(params[name.rsplit("/", 1)[0] + "/weight"])
            var.set_value(jnp.asarray(packed if key[-1] == "packed" else scale))
        else:
            var.set_value(jnp.asarray(params[name], var.get_value().dtype))
    return nnx.from_flat_state(flat)


def export(args: argparse.Namespace, metrics: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """Write the QAT model as a K2 HF checkpoint, reload it with k2jax.load and measure it."""
    tokenizer_dir = args.work / "tokenizer"
    cfg = bundled_config(Tokenizer.from_dir(tokenizer_dir), Int4Quant())
    final = args.work / ("final_params.npz" if args.extend_steps else "qat_params.npz")
    write_hf_checkpoint(args.out, cfg, int4_state(dict(np.load(final)), cfg), tokenizer_dir)
    model = k2jax.load(args.out)
    _, tasks = make_corpus.tasks(args.seed, args.chats, make_corpus.DEFAULT_HELDOUT_CHATS)
    chat_windows = evaluate_bundled.heldout_chat_windows(model.tokenizer, args.seed, args.chats, args.seq_len,
                                                         TEST_WINDOWS)
    checkpoint = {
        "size_bytes": sum(f.stat().st_size for f in args.out.iterdir()),
        "test_heldout_chat_perplexity": evaluate_bundled.perplexity(model, chat_windows),
        "heldout_code_perplexity": evaluate_bundled.perplexity(model, evaluate_bundled.heldout_code_windows(
            model.tokenizer, args.seed, args.seq_len, args.eval_windows)),
        "test_tool_use": evaluate_bundled.tool_use(model, tasks[:TEST_TASKS]),
        "tool_use": evaluate_bundled.tool_use(model, tasks[:args.eval_tasks]),
        "code_sample": evaluate_bundled.code_sample(model),
    }
    log(json.dumps(checkpoint, indent=2))
    return {**metrics, "seed": args.seed, "seq_len": args.seq_len, "test_windows": TEST_WINDOWS,
            "test_tasks": TEST_TASKS, "checkpoint": checkpoint}


def main() -> None:
    """CLI: train (corpus, tokenizer, three runs) and/or export (checkpoint, evaluation, metrics JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("all", "train", "extend", "export"), default="all")
    parser.add_argument("--out", type=Path, default=BUNDLED_DIR)
    parser.add_argument("--work", type=Path, default=Path("build/bundled"))
    parser.add_argument("--init", type=Path, default=None, help="K2 checkpoint dir to start from (tokenizer, weights)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chats", type=int, default=make_corpus.DEFAULT_CHATS, help="synthetic training conversations")
    parser.add_argument("--echoes", type=int, default=make_corpus.DEFAULT_ECHOES, help="echo (copy) drills")
    parser.add_argument("--tool-chats", type=int, default=make_corpus.DEFAULT_TOOL_CHATS,
                        help="conversations with tools drawn at random (make_corpus.random_tool_chat)")
    parser.add_argument("--code-chars", type=int, default=make_corpus.CODE_CHARS, help="stdlib source budget")
    parser.add_argument("--base-vocab", type=int, default=4096)
    parser.add_argument("--peak-lr", type=float, default=TrainSettings.peak_lr)
    parser.add_argument("--seq-len", type=int, default=TrainSettings.seq_len)
    parser.add_argument("--batch", type=int, default=TrainSettings.batch)
    parser.add_argument("--aligned", type=float, default=TrainSettings.aligned,
                        help="share of each batch's windows that start at a document's start")
    parser.add_argument("--windows", type=int, default=TrainSettings.windows,
                        help="which draw of training windows (0: the first; a later round on the same corpus and "
                             "held-out split draws others)")
    parser.add_argument("--trunk-steps", type=int, default=TrainSettings.trunk_steps)
    parser.add_argument("--branch-steps", type=int, default=TrainSettings.branch_steps)
    parser.add_argument("--extend-steps", type=int, default=TrainSettings.extend_steps)
    parser.add_argument("--eval-windows", type=int, default=48)
    parser.add_argument("--eval-tasks", type=int, default=100)
    parser.add_argument("--save-every", type=int, default=250)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.0f} s] {message}", flush=True)

    train_file = args.work / "train_metrics.json"
    if args.stage in ("all", "train"):
        train_file.write_text(json.dumps(train(args, log), indent=2) + "\n")
    if args.stage in ("all", "extend") and args.extend_steps:
        train_file.write_text(json.dumps(extend(args, json.loads(train_file.read_text()), log), indent=2) + "\n")
    if args.stage in ("all", "export"):
        metrics = export(args, json.loads(train_file.read_text()), log)
        (args.out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
