"""Per-row token sampling: greedy, temperature, top-k, top-p and min-p, with a seeded key per request; the sampled
token's log-probability under the model and, for rows that ask, the TOP_LOGPROBS most likely tokens come back with it.

An optional packed mask [B, ceil(V/32)] int32 (bit k of word j allows token 32j + k; see k2jax.grammar) limits each
row to its allowed tokens before any of that, so every sampling setting only ever picks an allowed token.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


TOP_K_MAX = 2**31 - 1
SEED_MAX = 2**32 - 1
TOP_LOGPROBS = 20  # most likely tokens a row can ask for with each sampled token
ROW_DTYPES = {"temperature": np.float32, "top_k": np.int32, "top_p": np.float32, "min_p": np.float32,
              "seed": np.uint32, "top_logprobs": np.int32}


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings; temperature 0 means greedy, top_k 0 and top_p 1 disable those filters;
    top_logprobs > 0 asks for that many most likely tokens (with their log-probs) beside each sampled one."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        if not (is_real(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (is_integer(self.top_k) and 0 <= self.top_k <= TOP_K_MAX):
            raise ValueError(f"top_k must be an integer in [0, {TOP_K_MAX}] (0 disables it), got {self.top_k!r}")
        if not (is_real(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (is_real(self.min_p) and 0 <= self.min_p <= 1):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not (is_integer(self.seed) and 0 <= self.seed <= SEED_MAX):
            raise ValueError(f"seed must be an integer in [0, {SEED_MAX}], got {self.seed!r}")
        if not (is_integer(self.top_logprobs) and 0 <= self.top_logprobs <= TOP_LOGPROBS):
            raise ValueError(f"top_logprobs must be an integer in [0, {TOP_LOGPROBS}], got {self.top_logprobs!r}")


class Logprobs(NamedTuple):
    """Log-probabilities under the model (log_softmax of its raw logits, before temperature, filters and masks): of
    each sampled token [...], and each row's TOP_LOGPROBS most likely token ids and theirs, most likely first
    [..., TOP_LOGPROBS] (zeros when no row of the batch asked for them)."""

    chosen: jax.Array | np.ndarray
    top_ids: jax.Array | np.ndarray
    top: jax.Array | np.ndarray


def token_logprobs(logprobs: Logprobs, n_top: int) -> tuple[list[float], list[tuple[tuple[int, float], ...]]]:
    """One row's host Logprobs ([n] and [n, TOP_LOGPROBS]) as lists: each token's log-prob and its n_top
    (id, log-prob) pairs (empty tuples when n_top is 0)."""
    chosen = np.asarray(logprobs.chosen, np.float64).tolist()
    if not n_top:
        return chosen, [()] * len(chosen)
    ids, top = np.asarray(logprobs.top_ids)[:, :n_top].tolist(), np.asarray(logprobs.top, np.float64)[:, :n_top].tolist()
    return chosen, [tuple(zip(i, v)) for i, v in zip(ids, top)]


def is_integer(value: object) -> bool:
    """Whether `value` is a Python or numpy integer (not a bool)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: object) -> bool:
    """Whether `value` is a real number (not a bool); NaN and infinities included."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


@functools.lru_cache(maxsize=4096)
def host_row(params: SamplingParams) -> tuple[np.generic, ...]:
    """One request's sampling settings cast to the step's dtypes (ROW_DTYPES order); ValueError if one does not fit.
    Kept for the last 4,096 settings: every step casts each running row's (~5 us a row, uncached)."""
    row = []
    for name, dtype in ROW_DTYPES.items():
        value = getattr(params, name)
        try:
            cast = dtype(value)
        except (OverflowError, TypeError, ValueError):
            raise ValueError(f"{name}={value!r} does not fit the sampler's {np.dtype(dtype).name}") from None
        if not np.isfinite(cast) or (np.issubdtype(dtype, np.integer) and cast != value):
            raise ValueError(f"{name}={value!r} does not fit the sampler's {np.dtype(dtype).name}")
        row.append(cast)
    return tuple(row)


def host_params(params: list[SamplingParams]) -> dict[str, np.ndarray]:
    """Per-row host arrays of a batch's sampling settings."""
    columns = zip(*(host_row(p) for p in params))
    return {name: np.array(column, dtype) for (name, dtype), column in zip(ROW_DTYPES.items(), columns)}


def stack_params(params: list[SamplingParams]) -> dict[str, jax.Array]:
    """Per-row device arrays of a batch's sampling settings (one transfer)."""
    return jax.device_put(host_params(params))


def _sorted_floor(scaled_BV: jax.Array, params: dict[str, jax.Array]) -> jax.Array:
    """Per row, the smallest logit that top-k and top-p keep [B, 1] (a full sort of the vocabulary)."""
    sorted_BV = jnp.sort(scaled_BV, axis=-1)[:, ::-1]
    V = scaled_BV.shape[-1]
    k_B = jnp.where(params["top_k"] > 0, jnp.minimum(params["top_k"], V), V)
    kth_B1 = jnp.take_along_axis(sorted_BV, (k_B - 1)[:, None], axis=-1)
    probs_sorted_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_sorted_BV, axis=-1) - probs_sorted_BV
    n_keep_B = jnp.maximum(jnp.sum(mass_before_BV < params["top_p"][:, None], axis=-1), 1)
    return jnp.maximum(kth_B1, jnp.take_along_axis(sorted_BV, (n_keep_B - 1)[:, None], axis=-1))


def filter_logits(logits_BV: jax.Array, params: dict[str, jax.Array]) -> jax.Array:
    """Temperature-scaled logits with everything outside top-k, top-p and min-p set to -inf.

    The sort that top-k and top-p need runs only when some row asks for them (min-p needs just the max).
    """
    temp_B = jnp.where(params["temperature"] > 0, params["temperature"], 1.0)
    scaled_BV = logits_BV.astype(jnp.float32) / temp_B[:, None]
    B = scaled_BV.shape[0]
    needs_sort = jnp.any((params["top_k"] > 0) | (params["top_p"] < 1))
    floor_B1 = jax.lax.cond(needs_sort, _sorted_floor, lambda *_: jnp.full((B, 1), -jnp.inf), scaled_BV, params)
    min_p_B1 = params["min_p"][:, None]
    min_p_floor_B1 = jnp.max(scaled_BV, axis=-1, keepdims=True) + jnp.log(jnp.maximum(min_p_B1, 1e-38))
    floor_B1 = jnp.maximum(floor_B1, jnp.where(min_p_B1 > 0, min_p_floor_B1, -jnp.inf))
    return jnp.where(scaled_BV >= floor_B1, scaled_BV, -jnp.inf)


def _draw(logits_BV: jax.Array, params: dict[str, jax.Array], pos_B: jax.Array) -> jax.Array:
    """A token per row from the filtered distribution; the key is (request seed, position)."""
    keys = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(params["seed"], pos_B)
    return jax.vmap(jax.random.categorical)(keys, filter_logits(logits_BV, params)).astype(jnp.int32)


STATES = 8  # states of a decode call's token automaton per row (StepMasks)
EDGES = 16  # tokens a state lists: its edges, and the tokens it adds to or drops from its row's mask


class StepMasks(NamedTuple):
    """A decode call's token automaton per row, which k2jax.grammar builds from the row's constraint and the device
    follows as it samples (k2jax.engine.DecodeRows): STATES states, state 0 where the row starts.

    State s first takes the tokens chain[r, s] lists (forced, without sampling; -1 after them), then samples among
    the tokens it allows: the row's packed words [rows, W] if base[r, s] (else none), plus the tokens add[r, s] lists,
    minus those drop[r, s] lists ([rows, STATES, EDGES] token lists, -1 padding). A sampled token that edges[r, s]
    lists moves the row to state to[r, s, e]; any other keeps the state's mask for the later steps (hold[r, s]) or
    lets them draw from every token, drafts that the host keeps only where the row's grammar allows them
    (k2jax.grammar.RowConstraint.accept). Once off the edges a row follows none again: its masks are stale."""

    words: np.ndarray
    base: np.ndarray
    add: np.ndarray
    drop: np.ndarray
    chain: np.ndarray
    edges: np.ndarray
    to: np.ndarray
    hold: np.ndarray

    @staticmethod
    def unconstrained(rows: int, words: int, steps: int) -> StepMasks:
        """`rows` rows that allow every token at every step (one state that holds, no chain, no edges)."""
        lists = np.full((rows, STATES, EDGES), -1, np.int32)
        return StepMasks(np.full((rows, words), -1, np.int32), np.ones((rows, STATES), bool), lists, lists.copy(),
                         np.full((rows, STATES, steps), -1, np.int32), lists.copy(), np.zeros_like(lists),
                         np.ones((rows, STATES), bool))

    def rows(self, index: Any) -> StepMasks:
        """The masks of the rows `index` selects."""
        return StepMasks(*(field[index] for field in self))

    def with_steps(self, steps: int) -> StepMasks:
        """These masks with chains cut or padded (-1) to `steps` steps."""
        chain = np.full(self.chain.shape[:2] + (steps,), -1, np.int32)
        chain[:, :, :min(steps, self.chain.shape[2])] = self.chain[:, :, :steps]
        return self._replace(chain=chain)


def drafts_exact(params: SamplingParams) -> bool:
    """Whether a draw from every token that an allowed set holds is the draw under that set with the same key, so a
    kept draft is what masked sampling would have drawn: true for greedy (which ignores the filters) and plain
    temperature (the argmax of the logits plus the key's Gumbel noise), not for temperature under top-k, top-p or
    min-p, whose cut moves with the set."""
    return params.temperature == 0 or (params.top_k == 0 and params.top_p == 1 and params.min_p == 0)


def mask_words(vocab: int) -> int:
    """Words of a packed allowed-token mask over `vocab` tokens (bit t % 32 of word t // 32)."""
    return -(-vocab // 32)


def unpack_mask(mask_BW: jax.Array, vocab: int) -> jax.Array:
    """Packed allowed-token words [B, W] int32 -> bool [B, vocab]."""
    bits_BW32 = (mask_BW.astype(jnp.uint32)[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    return bits_BW32.reshape(mask_BW.shape[0], -1)[:, :vocab].astype(bool)


def _top(logp_BV: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each row's TOP_LOGPROBS most likely ids and their log-probs (fewer columns, zero-padded, for a tiny vocab)."""
    k = min(TOP_LOGPROBS, logp_BV.shape[-1])
    top_BK, ids_BK = jax.lax.top_k(logp_BV, k)
    pad = ((0, 0), (0, TOP_LOGPROBS - k))
    return jnp.pad(ids_BK.astype(jnp.int32), pad), jnp.pad(top_BK, pad)


def _no_top(logp_BV: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Zeros in _top's shapes (no row asked for top tokens)."""
    B = logp_BV.shape[0]
    return jnp.zeros((B, TOP_LOGPROBS), jnp.int32), jnp.zeros((B, TOP_LOGPROBS), jnp.float32)


def _masked(mask_BW: jax.Array, logits_BV: jax.Array) -> jax.Array:
    """The logits with the tokens mask_BW does not allow at -inf."""
    return jnp.where(unpack_mask(mask_BW, logits_BV.shape[-1]), logits_BV, -jnp.inf)


def sample(logits_BV: jax.Array, params: dict[str, jax.Array], pos_B: jax.Array,
           mask_BW: jax.Array | None = None, forced_B: jax.Array | None = None) -> tuple[jax.Array, Logprobs]:
    """Next token per row (forced_B[b] where that is >= 0, else among the tokens mask_BW allows, if given) and its
    Logprobs, from the same logits; all-greedy batches skip the sampler, batches where no row asks for top tokens skip
    the top-k, batches whose masks allow every token skip unpacking them."""
    logp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
    top_ids_BK, top_BK = jax.lax.cond(jnp.any(params["top_logprobs"] > 0), _top, _no_top, logp_BV)
    if mask_BW is not None:
        logits_BV = jax.lax.cond(jnp.all(mask_BW == -1), lambda x: x, functools.partial(_masked, mask_BW), logits_BV)
    greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    hot_B = params["temperature"] > 0
    drawn_B = jax.lax.cond(jnp.any(hot_B), _draw, lambda *_: greedy_B, logits_BV, params, pos_B)
    tokens_B = jnp.where(hot_B, drawn_B, greedy_B)
    if forced_B is not None:
        tokens_B = jnp.where(forced_B >= 0, forced_B, tokens_B)
    return tokens_B, Logprobs(jnp.take_along_axis(logp_BV, tokens_B[:, None], axis=-1)[:, 0], top_ids_BK, top_BK)
