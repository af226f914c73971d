"""The offline corpus: echo drills repeat the user's text verbatim in the K2 chat format and stay in training."""

from __future__ import annotations

import random

from k2jax import chat
from tools import make_corpus


def test_echo_drill_answers_with_the_users_text_verbatim() -> None:
    rng = random.Random(random.randrange(2**32))
    for _ in range(20):
        drill = make_corpus.echo_drill(rng)
        asked, answer = drill.rsplit(chat.THINK_END, 1)
        text = answer.removesuffix(chat.IM_END)
        assert answer.endswith(chat.IM_END) and text and chat.IM_END not in text
        user_turn = asked.split("<|im_user|>user<|im_middle|>")[1].split(chat.IM_END)[0]
        assert user_turn.endswith(text)  # every request puts the text last
        assert chat.parse_output(text).content == text


def test_echo_drills_are_training_documents_only() -> None:
    plain = make_corpus.make_corpus(0, code_chars=20_000, n_chats=10, n_heldout_chats=5)
    drilled = make_corpus.make_corpus(0, code_chars=20_000, n_chats=10, n_heldout_chats=5, n_echoes=7)
    assert len(drilled.train) == len(plain.train) + 7 and sorted(drilled.heldout) == sorted(plain.heldout)
    assert sum("repeated exactly" in doc for doc in drilled.train) == 7
