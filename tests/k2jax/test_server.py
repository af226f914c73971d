"""The HTTP server through the official `openai` client, on 127.0.0.1: results, streaming, errors, load, disconnects.

The model is a tiny random K2 model with a small trained BPE tokenizer, written and loaded like a real checkpoint.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import k2jax
from checkpoints.hf_writer import write_hf_checkpoint
from checkpoints.synthetic import random_state
from k2jax import chat
from k2jax.scheduler import Output, Scheduler
from k2jax.server import BackgroundServer, ChatBody, Choice, Service, TextStream, chat_delta, chat_message, create_app
from k2jax.tokenizer import KIMI_PATTERN, Tokenizer, byte_to_unicode, kimi_specials

openai = pytest.importorskip("openai")

KEY = "test-key"
NAME = "tiny-k2"
SLOTS = 8
CONTEXT = 248
TIMEOUT_S = 120.0
MESSAGES = [{"role": "user", "content": "Write a function that adds two numbers."}]


def train_tokenizer() -> Tokenizer:
    """A 512-token byte-level BPE learned from two stdlib modules, with Kimi's reserved tokens and chat template."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    texts = [Path(sysconfig.get_paths()["stdlib"], name).read_text() for name in ("json/encoder.py", "textwrap.py")]
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(KIMI_PATTERN), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    byte_of = {c: b for b, c in byte_to_unicode().items()}
    tokens = [bytes(byte_of[c] for c in s) for s, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])]
    return Tokenizer(tokens, kimi_specials(len(tokens)), chat.bundled_template())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tok = train_tokenizer()
    cfg = dataclasses.replace(k2jax.preset("tiny"), vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                              eos_token_id=tok.eos_id)
    root = tmp_path_factory.mktemp("served")
    tok.save(root / "tokenizer")
    write_hf_checkpoint(root / "model", cfg, random_state(cfg, seed=3, dtype=np.float32), root / "tokenizer")
    return root / "model"


@pytest.fixture(scope="module")
def model(checkpoint):
    return k2jax.load(checkpoint)


def serve(model, **scheduler_args):
    """A started scheduler and an HTTP server over it (a context manager yielding (server, service))."""
    scheduler = Scheduler(model, **{"n_slots": SLOTS, "max_context": CONTEXT, "prefill_chunk": 64, **scheduler_args})
    service = Service(model, scheduler.start(), NAME, KEY)
    return BackgroundServer(create_app(service)), service


@pytest.fixture(scope="module")
def server(model):
    http, service = serve(model)
    with http:
        yield http, service
    service.scheduler.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0].url, api_key=KEY, max_retries=0, timeout=TIMEOUT_S)


def wait_until(cond, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def no_leaks(service: Service) -> None:
    wait_until(lambda: service.scheduler.running == 0)
    assert service.scheduler.free_slots == SLOTS and service.scheduler.queue_depth == 0


def test_models_health_metrics(server, client):
    http, _ = server
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    base = f"http://127.0.0.1:{http.port}"
    assert httpx.get(f"{base}/health", timeout=10).json() == {"status": "ok"}
    metrics = httpx.get(f"{base}/metrics", timeout=10).text
    for name in ("k2jax_queue_depth", "k2jax_running_requests", "k2jax_generation_tokens_per_second",
                 "k2jax_time_to_first_token_seconds_bucket"):
        assert name in metrics


def test_chat_equals_generate(model, client):
    ids = model.tokenizer.apply_chat_template(MESSAGES, tokenize=True)
    ref = model.generate([ids], max_new_tokens=12)
    parsed = chat.parse_output(ref.texts[0])
    out = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=12, temperature=0)
    message = out.choices[0].message
    assert message.content == parsed.content
    assert getattr(message, "reasoning_content", None) == parsed.reasoning_content
    assert out.choices[0].finish_reason == ref.finish_reasons[0]
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), len(ref.ids[0]))


def test_chat_stream_equals_non_stream(client):
    kw = {"model": NAME, "messages": MESSAGES, "max_tokens": 20, "temperature": 0.8, "seed": 7}
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert content == (whole.choices[0].message.content or "")
    assert reasoning == (getattr(whole.choices[0].message, "reasoning_content", None) or "")
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_and_stop_strings(model, client):
    prompt = "def add(a, b):"
    ref = model.generate([prompt], max_new_tokens=16)
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0)
    assert out.choices[0].text == ref.texts[0] and out.usage.completion_tokens == len(ref.ids[0])
    streamed = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == ref.texts[0]
    stop = ref.texts[0][3:6]
    cut = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == ref.texts[0][: ref.texts[0].find(stop)]
    needed = next(k for k in range(1, 17) if stop in model.tokenizer.decode(ref.ids[0][:k]))
    assert cut.usage.completion_tokens == needed
    by_ids = client.completions.create(model=NAME, prompt=model.tokenizer.encode(prompt), max_tokens=16,
                                       temperature=0, n=2)
    assert [c.text for c in by_ids.choices] == [ref.texts[0]] * 2


@pytest.mark.parametrize(("body", "status", "match"), [
    ("{not json", 400, "not valid JSON"),
    ({"model": "nope", "messages": MESSAGES}, 404, "does not exist"),
    ({"model": NAME, "messages": MESSAGES, "max_tokens": -1}, 400, "max_tokens must be >= 1"),
    ({"model": NAME, "messages": MESSAGES, "max_tokens": 10**9}, 400, "exceeds this server's context"),
    ({"model": NAME, "messages": MESSAGES, "temperature": 7}, 400, "temperature must be in"),
    ({"model": NAME, "messages": [{"role": "robot", "content": "hi"}]}, 422, "messages.0.role"),
    ({"model": NAME, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 422, "parts are supported"),
    ({"model": NAME, "messages": "hello"}, 422, "messages"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x " * 600}]}, 413, "context is 248 tokens"),
    ({"model": NAME, "messages": MESSAGES, "tool_choice": "required"}, 400, "needs a non-empty `tools`"),
    ({"model": NAME, "messages": MESSAGES, "logprobs": True}, 400, "logprobs is not supported"),
])
def test_errors_are_openai_shaped(server, client, body, status, match):
    http, service = server
    raw = body if isinstance(body, str) else json.dumps(body)
    reply = httpx.post(f"{http.url}/chat/completions", content=raw, timeout=TIMEOUT_S,
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert reply.status_code == status
    error = reply.json()["error"]
    assert match in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert client.completions.create(model=NAME, prompt="ok", max_tokens=2).usage.completion_tokens <= 2
    no_leaks(service)


def test_wrong_api_key_and_unknown_route(server):
    http, _ = server
    bad = openai.OpenAI(base_url=http.url, api_key="wrong", max_retries=0, timeout=TIMEOUT_S)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=http.url, api_key=KEY, max_retries=0).models.retrieve("other")
    assert httpx.get(f"{http.url}/nowhere", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404


def test_full_queue_answers_429_and_others_keep_working(model, client):
    http, service = serve(model, max_queue=1)
    with http:
        busy = openai.OpenAI(base_url=http.url, api_key=KEY, max_retries=0, timeout=TIMEOUT_S)
        with pytest.raises(openai.RateLimitError):
            busy.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4, n=16)
        assert busy.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=3).usage.completion_tokens <= 3
        no_leaks(service)
    service.scheduler.close()
    assert client.models.list().data


def test_64_concurrent_streams_finish_with_their_token_counts(server):
    http, service = server
    budgets = [4 + (i * 7) % 29 for i in range(64)]

    async def one(aclient, i: int) -> tuple[str, int, str]:
        stream = await aclient.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": f"request {i}"}], max_tokens=budgets[i],
            temperature=1.0, seed=i, stream=True, stream_options={"include_usage": True})
        finish, text = None, ""
        async for chunk in stream:
            if chunk.choices:
                delta = chunk.choices[0].delta
                text += (delta.content or "") + (getattr(delta, "reasoning_content", None) or "")
                finish = chunk.choices[0].finish_reason or finish
            elif chunk.usage:
                return finish, chunk.usage.completion_tokens, text
        raise AssertionError("stream ended without a usage chunk")

    async def run_all():
        async with openai.AsyncOpenAI(base_url=http.url, api_key=KEY, max_retries=0, timeout=TIMEOUT_S) as aclient:
            return await asyncio.wait_for(asyncio.gather(*(one(aclient, i) for i in range(64))), TIMEOUT_S)

    results = asyncio.run(run_all())
    for (finish, tokens, _), budget in zip(results, budgets):
        assert (finish == "length" and tokens == budget) or (finish in ("stop", "tool_calls") and tokens < budget)
    assert sum(f == "length" for f, _, _ in results) >= 56
    no_leaks(service)
    metrics = {s.name: s.value for family in text_string_to_metric_families(
        httpx.get(f"http://127.0.0.1:{http.port}/metrics", timeout=10).text) for s in family.samples}
    assert metrics["k2jax_time_to_first_token_seconds_count"] >= 64
    assert metrics["k2jax_generation_tokens_total"] >= sum(tokens for _, tokens, _ in results)
    assert metrics["k2jax_generation_tokens_per_second"] > 0 and metrics["k2jax_running_requests"] == 0


def test_disconnect_mid_stream_frees_the_slot(model):
    # one token per scheduler round and the whole context to fill: the request cannot finish before the
    # server notices its client left, however fast the machine
    http, service = serve(model, max_context=500, decode_steps=1)
    body = {"model": NAME, "prompt": "def add(a, b):", "max_tokens": 480, "stream": True, "ignore_eos": True}
    with http, httpx.Client(timeout=TIMEOUT_S) as http_client:
        with http_client.stream("POST", f"{http.url}/completions", json=body,
                                headers={"Authorization": f"Bearer {KEY}"}) as reply:
            assert next(reply.iter_lines()).startswith("data: ")
        no_leaks(service)
        assert service.scheduler.cancelled == 1, "the request ran on after its client left"


def test_tool_call_output_becomes_tool_calls(model, server):
    _, service = server
    text = (f"{chat.THINK_BEGIN}Look it up.{chat.THINK_END}Checking.{chat.SECTION_BEGIN}{chat.CALL_BEGIN}"
            f'functions.get_weather:0{chat.ARGUMENT_BEGIN}{{"city": "Paris"}}{chat.CALL_END}{chat.SECTION_END}')
    ids = model.tokenizer.encode(text)
    choice = Choice(TextStream(model.tokenizer, ()), chat.StreamParser())
    deltas = []
    for lo in range(0, len(ids), 3):
        last = lo + 3 >= len(ids)
        deltas += choice.add(Output(tuple(ids[lo:lo + 3]), (0.0,) * 3, "stop" if last else None))[1]
    streamed = [chat_delta(d, 0) for d in deltas]
    assert "".join(d.get("reasoning_content", "") for d in streamed) == "Look it up."
    assert "".join(d.get("content", "") for d in streamed) == "Checking."
    call = {"index": 0, "id": "functions.get_weather:0", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assert [d["tool_calls"] for d in streamed if "tool_calls" in d] == [[call]]
    assert choice.finish_reason() == "tool_calls"
    message = chat_message(choice)
    assert message["content"] == "Checking." and message["tool_calls"][0]["function"] == call["function"]

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    forced = {choice: model.tokenizer.decode(service.tool_setup(
        ChatBody(model=NAME, messages=MESSAGES, tools=tools, tool_choice=choice))[2])
        for choice in ("auto", "required")}
    assert forced == {"auto": "", "required": f"{chat.SECTION_BEGIN}{chat.CALL_BEGIN}functions."}
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert model.tokenizer.decode(service.tool_setup(ChatBody(model=NAME, messages=MESSAGES, tools=tools,
                                                              tool_choice=named))[2]).endswith(
        f"functions.get_weather:0{chat.ARGUMENT_BEGIN}")
    none = service.tool_setup(ChatBody(model=NAME, messages=MESSAGES, tools=tools, tool_choice="none"))
    assert none[0] is None and model.tokenizer.token_id(chat.SECTION_BEGIN) in none[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_cli(checkpoint: Path, *args: str) -> subprocess.Popen:
    """`python -m k2jax.serve` on the test checkpoint (key from the environment, CPU only)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "K2JAX_API_KEY": KEY}
    return subprocess.Popen([sys.executable, "-m", "k2jax.serve", "--model", str(checkpoint), "--log-level",
                             "warning", *args], env=env)


def wait_for_health(port: int, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        assert all(p.poll() is None for p in procs), "k2jax-serve exited"
        assert time.monotonic() < deadline, "k2jax-serve did not come up"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_cli_serves_on_localhost(checkpoint):
    port = free_port()
    proc = start_cli(checkpoint, "--port", str(port), "--max-batch", "2", "--max-context", "64")
    try:
        wait_for_health(port, [proc])
        base = f"http://127.0.0.1:{port}"
        models = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
        assert models["data"][0]["id"] == "model" and models["data"][0]["max_model_len"] == 64
        assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 401
    finally:
        stop([proc])


def test_two_processes_serve_like_one_and_fail_loudly_without_a_peer(checkpoint, client):
    port, coordinator = free_port(), free_port()
    common = ["--port", str(port), "--served-model-name", NAME, "--max-batch", "2", "--max-context", "120",
              "--prefill-chunk", "64", "--coordinator", f"127.0.0.1:{coordinator}", "--num-processes", "2",
              "--step-timeout", "120", "--peer-timeout", "5"]
    procs = [start_cli(checkpoint, *common, "--process-id", str(i)) for i in range(2)]
    try:
        wait_for_health(port, procs)
        both = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT_S)
        prompts = ["def add(a, b):", "import json", "class Point:"]

        def complete(api, prompt: str) -> str:
            return api.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0).choices[0].text

        with ThreadPoolExecutor(len(prompts)) as pool:  # concurrent: they share steps on both processes
            got = list(pool.map(lambda p: complete(both, p), prompts))
        assert got == [complete(client, p) for p in prompts]
        procs[1].kill()
        assert procs[0].wait(TIMEOUT_S) == 1, "process 0 must stop, and say so, when its peer is gone"
    finally:
        stop(procs)


def test_cli_rejects_a_missing_model(tmp_path, capsys):
    from k2jax.serve import main

    assert main(["--model", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_launcher_commands():
    from k2jax.serve_launch import main, ssh_commands, tpu_command

    first, second = ssh_commands(["gpu0", "gpu1"], 8476, ["--model", "/ckpt dir"])
    assert first[:2] == ["ssh", "gpu0"] and second[:2] == ["ssh", "gpu1"]
    assert "--coordinator gpu0:8476 --num-processes 2 --process-id 1 --model '/ckpt dir'" in second[2]
    tpu = tpu_command("pod", "us-east5-a", None, ["--model", "/ckpt"])
    assert "--worker=all" in tpu and tpu[-1] == "python -m k2jax.serve --coordinator auto --model /ckpt"
    assert main(["--hosts", "a,b", "--", "--model", "/m"]) == 0


def test_text_stream_holds_partial_characters_and_stop_prefixes(model):
    tok = model.tokenizer
    ids = tok.encode("naïve café END more")
    stream = TextStream(tok, ["END"])
    pieces = [stream.feed([token]) for token in ids]
    assert "".join(pieces) == "naïve café " and stream.stopped and not any("\ufffd" in p for p in pieces)
    assert stream.used == next(k for k in range(1, len(ids) + 1) if "END" in tok.decode(ids[:k]))
    rest = TextStream(tok, ["END"])
    assert rest.feed(ids[:3]) + rest.feed([], final=True) == tok.decode(ids[:3])
