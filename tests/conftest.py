"""Shared test fixtures. Everything is built in-process: tests never download from a hub."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

import pytest
import torch
from transformers import PreTrainedTokenizerFast

# Tests never download: a hub id must be in the local cache (and none is), as for every selpo command.
os.environ["HF_HUB_OFFLINE"] = "1"

# Whitespace-split words: "Human:" is one token, and decode() joins tokens with single spaces, so a text
# round-trips as " ".join(text.split()). Numbered words w0..w99 make long sequences easy.
TEST_WORDS = tuple(
    "Human: Assistant: user: assistant: system: hello hi how are you I am fine good bad great what is the a "
    "an of sky color blue red green cat dog sat on mat yes no maybe two plus three four five answer question "
    "please thanks tell me about it this that and or not very".split()
) + tuple(f"w{i}" for i in range(100))

# Renders "user: <content> " per message and "assistant:" for the generation prompt.
TEST_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(autouse=True, scope="session")
def one_thread() -> Iterator[None]:
    """The tests' models are tiny: intra-op threads gain nothing, and on a busy 2-core box OpenMP threads waiting
    on each other made single forwards 20-100x slower. (Subprocess tests set OMP_NUM_THREADS themselves.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_word_tokenizer(words: Iterable[str] = TEST_WORDS, *, bos: bool = False) -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer: <pad>=0, <eos>=1, <unk>=2 (and <bos>=3 prepended to plain text if bos)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["<pad>", "<eos>", "<unk>"] + (["<bos>"] if bos else [])
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*specials, *words]))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:  # Llama-style: the tokenizer itself prepends BOS when add_special_tokens=True
        bos_id = [("<bos>", vocab["<bos>"])]
        backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=bos_id)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        bos_token="<bos>" if bos else None,
    )
    tokenizer.chat_template = TEST_CHAT_TEMPLATE
    return tokenizer


@pytest.fixture
def word_tokenizer() -> PreTrainedTokenizerFast:
    return build_word_tokenizer()


@pytest.fixture
def make_word_tokenizer() -> Callable[..., PreTrainedTokenizerFast]:
    """Factory: make_word_tokenizer(words=TEST_WORDS, bos=False)."""
    return build_word_tokenizer
