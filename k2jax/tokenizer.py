"""Kimi's tiktoken BPE as a `tokenizers.Tokenizer`: read and write tokenizer dirs, encode, decode, chat prompts."""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from k2jax import chat

TIKTOKEN_FILE = "tiktoken.model"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
NUM_RESERVED_SPECIAL_TOKENS = 256

# Kimi's pre-tokenizer (tokenization_kimi.py); the && class intersections need onig, fancy-regex or regex's V1.
KIMI_PATTERN = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# Kimi's named reserved tokens: offset from the first reserved id -> (name, skipped by decode(skip_special=True)).
KIMI_NAMED_SPECIALS: dict[int, tuple[str, bool]] = {
    0: ("[BOS]", True),
    1: ("[EOS]", True),
    2: ("<|im_end|>", True),
    3: ("<|im_user|>", True),
    4: ("<|im_assistant|>", True),
    6: ("<|start_header_id|>", True),
    7: ("<|end_header_id|>", True),
    9: ("[EOT]", True),
    10: ("<|im_system|>", True),
    11: (chat.SECTION_BEGIN, False),
    12: (chat.SECTION_END, False),
    13: (chat.CALL_BEGIN, False),
    14: (chat.ARGUMENT_BEGIN, False),
    15: (chat.CALL_END, False),
    17: ("<|im_middle|>", True),
    22: (chat.THINK_BEGIN, False),
    23: (chat.THINK_END, False),
    254: ("[UNK]", True),
    255: ("[PAD]", True),
}


class SpecialToken(NamedTuple):
    """One reserved token: its text, id, and whether decode(skip_special=True) drops it."""

    content: str
    id: int
    special: bool


def reserved_name(token_id: int) -> str:
    """Name of an unnamed reserved id, as Kimi's tokenizer spells it."""
    return f"<|reserved_token_{token_id}|>"


def kimi_special(offset: int, num_base: int) -> SpecialToken:
    """Kimi's reserved token `offset` places after the base tokens: its name, or reserved_token_{id}."""
    content, special = KIMI_NAMED_SPECIALS.get(offset, (reserved_name(num_base + offset), True))
    return SpecialToken(content, num_base + offset, special)


def kimi_specials(num_base: int, num_reserved: int = NUM_RESERVED_SPECIAL_TOKENS) -> list[SpecialToken]:
    """Kimi's reserved tokens placed after `num_base` base tokens (names from Kimi's tokenizer_config)."""
    return [kimi_special(offset, num_base) for offset in range(num_reserved)]


def read_tiktoken_file(path: str | os.PathLike) -> list[bytes]:
    """Token byte strings in rank order from a tiktoken file (`base64 rank` per line, ranks 0..n-1)."""
    tokens: list[bytes] = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2 or not fields[1].isdigit():
                raise ValueError(f"{path}:{number}: expected 'base64 rank', got {line[:80]!r}")
            if int(fields[1]) != len(tokens):
                raise ValueError(
                    f"{path}:{number}: rank {int(fields[1])}, expected {len(tokens)} (ranks must be 0..n-1 in order)"
                )
            try:
                tokens.append(base64.b64decode(fields[0], validate=True))
            except binascii.Error as e:
                raise ValueError(f"{path}:{number}: bad base64 token: {e}") from None
    check_tokens(tokens, str(path))
    return tokens


def write_tiktoken_file(path: str | os.PathLike, tokens: Sequence[bytes]) -> None:
    """Write token byte strings (index = rank) as a tiktoken file, the format Kimi ships."""
    check_tokens(tokens, str(path))
    lines = (f"{base64.b64encode(token).decode('ascii')} {rank}\n" for rank, token in enumerate(tokens))
    Path(path).write_text("".join(lines), encoding="ascii")


def check_tokens(tokens: Sequence[bytes], where: str) -> None:
    """Reject a vocabulary that byte-level BPE cannot use: duplicates, empty tokens, missing single bytes."""
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"{where}: duplicate tokens in the vocabulary")
    if any(not isinstance(t, bytes) or not t for t in tokens):
        raise ValueError(f"{where}: every token must be a non-empty bytes object")
    missing = set(range(256)) - {t[0] for t in tokens if len(t) == 1}
    if missing:
        raise ValueError(f"{where}: {len(missing)} single bytes are missing from the vocabulary (e.g. {min(missing)})")


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, the alphabet of byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def tiktoken_merge(ranks: Mapping[bytes, int], token: bytes) -> tuple[bytes, bytes] | None:
    """The pair tiktoken merges last to build `token` from its bytes using lower ranks, or None if it never does."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        pair_ranks = [ranks.get(a + b, limit) for a, b in zip(parts, parts[1:])]
        best = min(pair_ranks)
        if best >= limit:
            return None
        i = pair_ranks.index(best)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


def build_bpe(tokens: Sequence[bytes], specials: Sequence[SpecialToken]) -> HFTokenizer:
    """A byte-level `tokenizers` BPE that encodes exactly as tiktoken does with these ranks and Kimi's regex."""
    ranks = {token: rank for rank, token in enumerate(tokens)}
    alphabet = byte_to_unicode()

    def spell(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    merges = [pair for pair in (tiktoken_merge(ranks, t) for t in tokens if len(t) > 1) if pair is not None]
    model = BPE(
        {spell(t): rank for rank, t in enumerate(tokens)}, [(spell(a), spell(b)) for a, b in merges], ignore_merges=True
    )
    tokenizer = HFTokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(KIMI_PATTERN), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # Every reserved token is "special" here so encode_special_tokens can turn all of them into plain text.
    tokenizer.add_special_tokens(
        [AddedToken(s.content, special=True, normalized=False) for s in sorted(specials, key=lambda s: s.id)]
    )
    added = {s.content: i for i, s in tokenizer.get_added_tokens_decoder().items()}
    wrong = [s for s in specials if added.get(s.content) != s.id]
    if wrong:
        raise ValueError(f"reserved tokens must follow the {len(tokens)} base tokens without gaps: {wrong[0]}")
    return tokenizer


def config_token(
    config: Mapping[str, Any], field: str, default: str, specials: Sequence[SpecialToken], where: str
) -> str:
    """A reserved token's name from tokenizer_config.json, given either as a string or as {"content": ...}."""
    value = config.get(field) or default
    value = value.get("content") if isinstance(value, Mapping) else value
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} must be a string or an object with 'content'")
    if value not in {s.content for s in specials}:
        raise ValueError(f"{where}: field {field!r} names {value!r}, which is not one of the reserved tokens")
    return value


def config_specials(config: Mapping[str, Any], num_base: int, where: str) -> list[SpecialToken]:
    """Kimi's reserved tokens renamed and flagged by the config's added_tokens_decoder."""
    decoder = config.get("added_tokens_decoder", {})
    if not isinstance(decoder, Mapping):
        raise ValueError(f"{where}: field 'added_tokens_decoder' must be an object mapping ids to tokens")
    specials = {s.id: s for s in kimi_specials(num_base)}
    for key, entry in decoder.items():
        if not key.isdigit() or int(key) not in specials:
            raise ValueError(
                f"{where}: added_tokens_decoder id {key!r} is not a reserved id "
                f"in [{num_base}, {num_base + NUM_RESERVED_SPECIAL_TOKENS})"
            )
        if not isinstance(entry, Mapping) or not isinstance(entry.get("content"), str):
            raise ValueError(f"{where}: added_tokens_decoder[{key!r}] needs a string 'content'")
        specials[int(key)] = SpecialToken(entry["content"], int(key), bool(entry.get("special", True)))
    return list(specials.values())


def check_reserved_ids(config: Mapping[str, Any], num_base: int, tiktoken_path: Path, config_path: Path) -> None:
    """Reject a rank file shorter than the reserved ids the config numbers after it (a truncated tiktoken.model),
    naming the rank file rather than the config."""
    decoder = config.get("added_tokens_decoder")
    ids = [int(k) for k in decoder if isinstance(k, str) and k.isdigit()] if isinstance(decoder, Mapping) else []
    if ids and min(ids) > num_base and max(ids) >= num_base + NUM_RESERVED_SPECIAL_TOKENS:
        raise ValueError(
            f"{tiktoken_path}: holds {num_base} tokens, but {config_path} numbers reserved tokens "
            f"{min(ids)}..{max(ids)}, which must lie in [{num_base}, {num_base + NUM_RESERVED_SPECIAL_TOKENS}): "
            "the rank file is truncated"
        )


def config_template(config: Mapping[str, Any], where: str) -> str | None:
    """The chat template inside tokenizer_config.json (a string, or HF's list of named templates), if any."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{where}: field 'chat_template' must be a string or a list with a 'default' template")
    return template


def read_config(path: Path) -> dict[str, Any]:
    """tokenizer_config.json as a dict ({} when the file is absent)."""
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return config


class Tokenizer:
    """Kimi K2's tokenizer: tiktoken ranks + 256 reserved tokens, run by the `tokenizers` library."""

    def __init__(
        self,
        tokens: Sequence[bytes],
        specials: Sequence[SpecialToken],
        chat_template: str | None = None,
        bos_token: str = "[BOS]",
        eos_token: str = "[EOS]",
    ):
        self.special_tokens = {s.content: s.id for s in specials}
        missing = [name for name in (bos_token, eos_token, chat.IM_END) if name not in self.special_tokens]
        if missing:
            raise ValueError(f"{missing[0]!r} must be one of the reserved tokens")
        self.tokens = list(tokens)
        self.specials = sorted(specials, key=lambda s: s.id)
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._skipped_ids = frozenset(s.id for s in self.specials if s.special)
        self._tokenizer = build_bpe(self.tokens, self.specials)

    @classmethod
    def from_tiktoken_file(
        cls,
        path: str | os.PathLike,
        num_reserved_special_tokens: int = NUM_RESERVED_SPECIAL_TOKENS,
        chat_template: str | None = None,
    ) -> Tokenizer:
        """A tokenizer from a tiktoken rank file plus Kimi's reserved tokens with Kimi's names."""
        tokens = read_tiktoken_file(path)
        return cls(tokens, kimi_specials(len(tokens), num_reserved_special_tokens), chat_template)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """A tokenizer from a checkpoint dir: tiktoken.model, tokenizer_config.json and chat_template.jinja."""
        root = Path(path)
        if not (root / TIKTOKEN_FILE).is_file():
            raise FileNotFoundError(f"{root / TIKTOKEN_FILE}: no tiktoken rank file in the tokenizer dir")
        config_path = root / CONFIG_FILE
        config = read_config(config_path)
        tokens = read_tiktoken_file(root / TIKTOKEN_FILE)
        check_reserved_ids(config, len(tokens), root / TIKTOKEN_FILE, config_path)
        specials = config_specials(config, len(tokens), str(config_path))
        template_path = root / TEMPLATE_FILE
        if template_path.is_file():
            template, source = template_path.read_text(encoding="utf-8"), template_path
        else:
            template, source = config_template(config, str(config_path)), config_path
        if template is not None:
            chat.compile_template(template, str(source))
        return cls(
            tokens,
            specials,
            template,
            config_token(config, "bos_token", "[BOS]", specials, str(config_path)),
            config_token(config, "eos_token", "[EOS]", specials, str(config_path)),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write tiktoken.model, tokenizer_config.json and chat_template.jinja, as Moonshot ships them."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        write_tiktoken_file(root / TIKTOKEN_FILE, self.tokens)
        added = {
            str(s.id): {
                "content": s.content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": s.special,
            }
            for s in self.specials
        }
        config = {
            "added_tokens_decoder": added,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "clean_up_tokenization_spaces": False,
            "tokenizer_class": "TikTokenTokenizer",
        }
        (root / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (root / TEMPLATE_FILE).write_text(self.chat_template or chat.bundled_template(), encoding="utf-8")

    def token_id(self, name: str) -> int:
        """The id of a reserved token by its text, e.g. '<|im_end|>'."""
        if name not in self.special_tokens:
            raise KeyError(f"{name!r} is not one of this tokenizer's reserved tokens")
        return self.special_tokens[name]

    @property
    def vocab_size(self) -> int:
        """Number of ids: base tokens plus reserved tokens."""
        return len(self.tokens) + len(self.specials)

    @property
    def bos_id(self) -> int:
        """Id of [BOS]."""
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        """Id of [EOS]."""
        return self.token_id(self.eos_token)

    @property
    def im_end_id(self) -> int:
        """Id of <|im_end|>, the end of every chat turn."""
        return self.token_id(chat.IM_END)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end generation: <|im_end|> and [EOS]."""
        return (self.im_end_id, self.eos_id)

    @cached_property
    def token_bytes(self) -> list[bytes]:
        """Each id's bytes as decode joins them: a base token's bytes, a reserved token's name as the ByteLevel
        decoder spells it (its characters mapped back to bytes when all are in the byte alphabet, else UTF-8)."""
        byte_of = {c: b for b, c in byte_to_unicode().items()}
        names = [s.content for s in self.specials]
        return [*self.tokens, *(bytes(byte_of[c] for c in name) if all(c in byte_of for c in name) else name.encode()
                                for name in names)]

    @cached_property
    def _plain_tokenizer(self) -> HFTokenizer:
        """A copy that encodes reserved-token strings as ordinary text."""
        plain = HFTokenizer.from_str(self._tokenizer.to_str())
        plain.encode_special_tokens = True
        return plain

    def _backend(self, allow_special: bool) -> HFTokenizer:
        """The tokenizer that matches reserved-token strings (allow_special) or treats them as text."""
        return self._tokenizer if allow_special else self._plain_tokenizer

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Ids of `text`; reserved-token strings become their ids unless allow_special is False.

        Runs as a batch of one: the batch call lets other Python threads run meanwhile (the plain call holds the GIL).
        """
        return self.encode_batch([text], allow_special)[0]

    def encode_batch(self, texts: Iterable[str], allow_special: bool = True) -> list[list[int]]:
        """Ids of many texts, encoded in parallel by the tokenizers library."""
        return [e.ids for e in self._backend(allow_special).encode_batch_fast(list(texts), add_special_tokens=False)]

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters one token can stand for (a base token's bytes, or a reserved token's name)."""
        return max(max(map(len, self.tokens)), max(len(s.content) for s in self.specials))

    @cached_property
    def reserved_names(self) -> frozenset[str]:
        """The text of every reserved token (what chat.mark defuses inside user text)."""
        return frozenset(self.special_tokens)

    def encode_marked(self, text: str) -> list[int]:
        """Ids of a marked prompt (chat.render_marked, chat.mark): reserved-token names outside marked user text
        become their ids; the text between them, marks removed, is encoded as plain text."""
        pattern = chat.names_pattern(self.reserved_names)
        matches = list(pattern.finditer(text)) if pattern is not None else []
        bounds = [0, *(i for m in matches for i in m.span()), len(text)]
        pieces = [chat.unmark(text[a:b]) for a, b in zip(bounds[::2], bounds[1::2])]
        encoded = self.encode_batch(pieces, allow_special=False)
        ids = encoded[0]
        for match, piece in zip(matches, encoded[1:]):
            ids += [self.special_tokens[match[0]], *piece]
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special: bool = False) -> str:
        """Text of a 1-D sequence of ids; skip_special drops e.g. <|im_end|> but keeps think and tool-call tokens."""
        array = np.asarray(ids)
        if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
            raise ValueError(
                f"decode expects a 1-D sequence of integer ids, got shape {array.shape} dtype {array.dtype}"
            )
        if array.size and not (0 <= array.min() and array.max() < self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got {array.min()}..{array.max()}")
        kept = [i for i in array.tolist() if not (skip_special and i in self._skipped_ids)]
        return self._tokenizer.decode(kept, skip_special_tokens=False)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
    ) -> str | list[int]:
        """The K2 Thinking prompt for a conversation (the checkpoint's jinja template if it has one).

        Token ids hold reserved tokens only where the template writes them: reserved-token names inside message
        text, names, tool calls, tool results or tool declarations are encoded as plain text.
        """
        marked = self.render_marked(messages, tools, add_generation_prompt)
        return self.encode_marked(marked) if tokenize else chat.unmark(marked)

    def render_marked(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """The conversation's prompt with its user text marked, for encode_marked (see chat.render_marked)."""
        return chat.render_marked(
            messages,
            tools,
            add_generation_prompt,
            template=self.chat_template,
            names=self.reserved_names,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )


class Detokenizer:
    """Text of a growing id sequence in O(new ids): each id's bytes go through an incremental UTF-8 decoder that
    holds back an incomplete character, so the pieces `add` returns, then `flush`, join to exactly `decode(ids)`."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.token_bytes = tokenizer.token_bytes
        self.skipped = tokenizer._skipped_ids if skip_special else frozenset()
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, ids: Iterable[int]) -> str:
        """The text these ids complete (a character whose bytes are not all here yet waits)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < len(self.token_bytes)]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {len(self.token_bytes)})")
        return self.decoder.decode(b"".join(self.token_bytes[i] for i in ids if i not in self.skipped))

    def flush(self) -> str:
        """What is left at the end: an incomplete character becomes U+FFFD, as decode writes it."""
        return self.decoder.decode(b"", final=True)


class TextStream:
    """One sequence's text as ids arrive, in O(new ids): incrementally decoded, cut at the first stop string, with a
    tail that could still grow into a stop string held back until it is decided.

    Ids are taken one at a time, so `used` counts exactly the ids up to the one that completed a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()):
        self.stops = tuple(stops)
        self.detokenizer = Detokenizer(tokenizer)
        self.used = 0
        self.stopped = self.finished = False
        self._parts: list[str] = []
        self._held = ""

    @property
    def text(self) -> str:
        """The text handed out so far (before the stop string, once one is found)."""
        return "".join(self._parts)

    def feed(self, ids: Iterable[int], final: bool = False) -> str:
        """The text these new ids make certain (all of the rest when final)."""
        pieces = []
        for token in ids:
            if self.stopped:
                break
            self.used += 1
            pieces.append(self._take(self.detokenizer.add((token,)), final=False))
        if final and not self.finished:
            self.finished = True
            if not self.stopped:
                pieces.append(self._take(self.detokenizer.flush(), final=True))
        return "".join(pieces)

    def _take(self, new: str, final: bool) -> str:
        """Cut new text (after what was held) at a stop string and hand out all but a possible stop-string prefix."""
        text = self._held + new
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            text, self.stopped = text[: min(hits)], True
        held = 0 if self.stopped or final else chat.held_suffix(text, self.stops)
        out, self._held = text[: len(text) - held], text[len(text) - held:]
        self._parts.append(out)
        return out
