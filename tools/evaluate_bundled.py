"""Measure a loaded model on the bundled model's held-out data: perplexity, tool-use success, a code sample.

Used by tools/train_bundled.py on the checkpoint it writes and by tests/tools/test_bundled.py on k2jax.load().
"""

from __future__ import annotations

import builtins
import io
import json
import keyword
import tokenize
from typing import Any

import numpy as np

from k2jax import chat
from k2jax.llm import Model
from tools import make_corpus

CODE_PROMPT = "def fibonacci(n):"


def token_stream(tokenizer: Any, docs: list[str]) -> np.ndarray:
    """All documents encoded and joined, each followed by [EOS]."""
    ids = tokenizer.encode_batch(docs)
    return np.fromiter((t for doc in ids for t in (*doc, tokenizer.eos_id)), np.int32)


def eval_windows(stream: np.ndarray, seq_len: int, count: int) -> np.ndarray:
    """Up to `count` evenly spaced, non-overlapping windows [N, T+1] of a token stream."""
    n = min(count, len(stream) // (seq_len + 1))
    stride = len(stream) // n
    return np.stack([stream[i * stride:i * stride + seq_len + 1] for i in range(n)])


def heldout_chat_windows(tokenizer: Any, seed: int, n_chats: int, seq_len: int, count: int) -> np.ndarray:
    """Windows over the synthetic conversations held out from `n_chats` training ones (independent of the stdlib)."""
    _, tasks = make_corpus.tasks(seed, n_chats, make_corpus.DEFAULT_HELDOUT_CHATS)
    return eval_windows(token_stream(tokenizer, [make_corpus.conversation(t) for t in tasks]), seq_len, count)


def heldout_code_windows(tokenizer: Any, seed: int, seq_len: int, count: int) -> np.ndarray:
    """Windows over the held-out standard-library files (which depend on the local Python's stdlib)."""
    _, heldout = make_corpus.code_documents(seed, make_corpus.CODE_CHARS, make_corpus.HELDOUT_SHARE)
    return eval_windows(token_stream(tokenizer, heldout), seq_len, count)


def perplexity(model: Model, windows: np.ndarray, batch: int = 8) -> float:
    """exp(mean next-token cross-entropy) of windows [N, T+1] through model.logits."""
    nll = []
    for i in range(0, len(windows), batch):
        chunk = windows[i:i + batch]
        logits = model.logits(chunk[:, :-1]).astype(np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll.append(logz - np.take_along_axis(logits, chunk[:, 1:, None], -1)[..., 0])
    return float(np.exp(np.concatenate(nll).mean()))


def turn_text(text: str) -> str:
    """Generated text up to the end of the assistant turn."""
    return text.split(chat.IM_END)[0]


def call_is_right(call: dict[str, Any], task: make_corpus.Task) -> bool:
    """The call names the task's tool with exactly the task's arguments."""
    return call["function"]["name"] == task.tool and json.loads(call["function"]["arguments"]) == task.arguments


def tool_use(model: Model, tasks: list[make_corpus.Task], max_new_tokens: int = 96) -> dict[str, float]:
    """Shares of tasks with a tool call the parser accepts, the right call, and the right final answer.

    The final turn is generated after the model's own call has run (its reasoning kept, as K2 Thinking does).
    """
    first = model.generate([make_corpus.prompt(make_corpus.call_messages(t)) for t in tasks], max_new_tokens)
    parsed = [chat.parse_output(turn_text(text)) for text in first.texts]
    called = [(t, p) for t, p in zip(tasks, parsed) if p.tool_calls]
    follow_ups = [make_corpus.prompt(make_corpus.result_messages(
        t, p.reasoning_content or "", p.tool_calls[0],
        make_corpus.run_tool(p.tool_calls[0]["function"]["name"], json.loads(p.tool_calls[0]["function"]["arguments"]))))
        for t, p in called]
    finals = model.generate(follow_ups, max_new_tokens).texts if follow_ups else []
    answered = [t.expected in chat.parse_output(turn_text(text)).content for (t, _), text in zip(called, finals)]
    n = len(tasks)
    return {"tasks": n, "well_formed_call_share": len(called) / n,
            "right_call_share": sum(call_is_right(p.tool_calls[0], t) for t, p in called) / n,
            "right_final_answer_share": sum(answered) / n}


def code_sample(model: Model, max_new_tokens: int = 64) -> dict[str, Any]:
    """The greedy continuation of CODE_PROMPT and how many of its leading lines compile as Python."""
    text = model.generate([CODE_PROMPT], max_new_tokens).texts[0]
    lines = (CODE_PROMPT + text).splitlines()
    return {"prompt": CODE_PROMPT, "completion": text,
            "compiling_lines": max((k for k in range(1, len(lines) + 1) if compiles("\n".join(lines[:k]))), default=0),
            "python_names": python_names(text)}


def python_names(source: str) -> list[str]:
    """The distinct Python keywords and builtins that `source` uses as code (not in comments or strings), in order.

    Read with the tokenize module up to the first token it cannot read, so Python-like text that does not compile
    still counts; comments and strings give none. Plain prose can still hold words such as `for` or `in`.
    """
    known, names = set(keyword.kwlist) | set(dir(builtins)), []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.NAME and tok.string in known and tok.string not in names:
                names.append(tok.string)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return names


def compiles(source: str) -> bool:
    """Whether `source` is syntactically valid Python."""
    try:
        compile(source, "<sample>", "exec")
    except SyntaxError:
        return False
    return True
