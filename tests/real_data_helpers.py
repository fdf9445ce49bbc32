"""Real-looking preference data and two different BPE tokenizers, all built in-process (nothing downloaded).

`dialogues(n, seed)` makes Anthropic-HH-like multi-turn dialogues with two replies each: mixed lengths, some
long prompts (a pasted document or a long history), replies that share their first words ("I", "I'm"),
rejected replies that are a prefix of the chosen one, a few empty replies and exact duplicates. `rows(...)`
writes them in each TRL format (standard, conversational, implicit prompt); all three describe the same pairs,
so a loader must give the same counts for each. `bytelevel_tokenizer` (GPT-2-like, ChatML template, no BOS,
no unknown token) and `metaspace_tokenizer` (SentencePiece-like, Llama-2 `[INST]` template, BOS, `<unk>`) are
trained on the dialogues' text, so weak-to-strong can be tested with two tokenizers in both directions.
`make_model_dir` saves a tiny random model with a tokenizer as an ordinary HF model directory.

Run as a script to write a larger file for measurements:
    python tests/real_data_helpers.py OUT.jsonl.gz --rows 5000 --format standard
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WORDS = (
    "the a an of to and in is it that for you on with as are be this was have not or at by from they we "
    "can your all my one so if about what there when which their more will would up out do like time just "
    "know people take into year good some could them see other than then now look only come its over think "
    "also back after use two how our work first well way even new want because any these give day most us "
    "garden water plant soil light seed tree leaf root grow week month spring summer winter rain sun warm "
    "cold bread flour yeast oven dough salt sugar butter bake recipe minute hour cup spoon bowl mix knead "
    "code python error file line function value list loop test run build install package version module "
    "travel train ticket city museum map hotel night morning walk street river bridge station car road "
    "money budget save spend bank account rent price cost month plan pay debt card interest rate loan "
    "sleep tired doctor health exercise walk drink coffee tea diet food meal habit stress rest body mind"
).split()
OPENERS = ("I", "I'm", "Sure,", "Well,", "Yes,", "No,", "Honestly,", "Thanks!", "Great question.")
ODD = ("café", "naïve", "déjà vu", "🙂", "über", "piñata", "—", "“quoted”")


@dataclass
class Dialogue:
    """Turns [(role, text)] ending with a user turn, and the two candidate assistant replies."""

    turns: list[tuple[str, str]]
    chosen: str
    rejected: str
    kind: set[str] = field(default_factory=set)
    """What makes it special: long_prompt, multi_turn, shared_start, prefix, empty, duplicate, odd_chars."""


def _sentence(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(max(1, n_words))]
    if rng.random() < 0.05:
        words[rng.randrange(len(words))] = rng.choice(ODD)
    words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice(".?!.")


def _text(rng: random.Random, n_words: int) -> str:
    out, left = [], n_words
    while left > 0:
        k = min(left, rng.randint(4, 16))
        out.append(_sentence(rng, k))
        left -= k
    return " ".join(out)


def _reply_words(rng: random.Random) -> int:
    """Mixed lengths: mostly short, a long tail (some replies alone exceed 512 tokens)."""
    roll = rng.random()
    return rng.randint(2, 20) if roll < 0.5 else rng.randint(20, 120) if roll < 0.93 else rng.randint(300, 800)


def dialogues(n: int, *, seed: int = 0) -> list[Dialogue]:
    rng = random.Random(seed)
    out: list[Dialogue] = []
    for i in range(n):
        kind: set[str] = set()
        n_user = rng.choice((1, 1, 1, 2, 2, 3, 4))
        turns: list[tuple[str, str]] = []
        for t in range(n_user):
            words = rng.randint(4, 40)
            if t == n_user - 1 and rng.random() < 0.06:  # a pasted document: a long prompt
                words, _ = rng.randint(500, 1200), kind.add("long_prompt")
            turns.append(("user", _text(rng, words)))
            if t < n_user - 1:
                turns.append(("assistant", _text(rng, rng.randint(5, 60))))
        if n_user > 1:
            kind.add("multi_turn")
        if sum(len(text.split()) for _, text in turns) > 450:
            kind.add("long_prompt")
        chosen, rejected = _text(rng, _reply_words(rng)), _text(rng, _reply_words(rng))
        roll = rng.random()
        if roll < 0.2:  # both replies start alike: the implicit split must not move this into the prompt
            opener = rng.choice(OPENERS)
            chosen, rejected = f"{opener} {chosen}", f"{opener} {rejected}"
            kind.add("shared_start")
        elif roll < 0.23:  # the rejected reply stops early: a prefix of the chosen one
            words = chosen.split()
            if len(words) < 4:
                words = (chosen + " " + _text(rng, 6)).split()
                chosen = " ".join(words)
            rejected = " ".join(words[: len(words) // 2])
            kind.add("prefix")
        elif roll < 0.245:  # one reply is empty: a malformed row
            if rng.random() < 0.5:
                chosen = ""
            else:
                rejected = ""
            kind.add("empty")
        if any(c in text for c in ODD for _, text in turns) or any(c in chosen + rejected for c in ODD):
            kind.add("odd_chars")
        out.append(Dialogue(turns, chosen, rejected, kind))
        if i % 97 == 96 and out:  # exact duplicates of an earlier row
            out.append(Dialogue(list(out[-5].turns), out[-5].chosen, out[-5].rejected, {"duplicate"}))
    return out[:n]


def _hh(turns: Sequence[tuple[str, str]]) -> str:
    names = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{names[role]}: {text}" for role, text in turns)


def _reply(text: str) -> str:
    return f" {text}" if text else ""


def rows(items: Iterable[Dialogue], fmt: str) -> list[dict[str, Any]]:
    """The dialogues as TRL rows: standard (HH strings), conversational (messages), implicit (HH strings)."""
    out = []
    for d in items:
        if fmt == "standard":
            out.append({"prompt": _hh(d.turns) + "\n\nAssistant:", "chosen": _reply(d.chosen),
                        "rejected": _reply(d.rejected)})
        elif fmt == "conversational":
            out.append({"prompt": [{"role": r, "content": t} for r, t in d.turns],
                        "chosen": [{"role": "assistant", "content": d.chosen}],
                        "rejected": [{"role": "assistant", "content": d.rejected}]})
        elif fmt == "implicit":
            prompt = _hh(d.turns) + "\n\nAssistant:"
            out.append({"chosen": prompt + _reply(d.chosen), "rejected": prompt + _reply(d.rejected)})
        else:
            raise ValueError(f"format {fmt!r}")
    return out


def write_rows(path: str | Path, items: Sequence[dict[str, Any]]) -> Path:
    """JSON lines (.jsonl, .jsonl.gz), a JSON list (.json, .json.gz) or Parquet, by the file name."""
    path = Path(path)
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(list(items)), path)
        return path
    if name.endswith((".json", ".json.gz")):
        text = json.dumps(list(items), ensure_ascii=False)
    else:
        text = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data, mtime=0) if name.endswith(".gz") else data)
    return path


def corpus(items: Iterable[Dialogue]) -> list[str]:
    return [text for d in items for text in [*(t for _, t in d.turns), d.chosen, d.rejected] if text]


# ------------------------------------------------------------------------------------------------ tokenizers

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA2 = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def bytelevel_tokenizer(texts: Iterable[str], *, vocab_size: int = 1200) -> Any:
    """GPT-2-like: byte-level BPE (every text is spelled, no unknown token), no BOS, ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", additional_special_tokens=specials[1:])
    tokenizer.chat_template = CHATML
    return tokenizer


def metaspace_tokenizer(texts: Iterable[str], *, vocab_size: int = 500) -> Any:
    """SentencePiece/Llama-like: metaspace BPE with <unk> (characters it never saw), BOS prepended to plain
    text, Llama-2 `[INST]` template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    ascii_chars = sorted(set(string.printable) - set(string.whitespace) | {"\n", "\u2581"})  # U+2581: the space
    # Every ASCII character is known; anything else the data holds (é, emoji, curly quotes) becomes <unk>.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=ascii_chars, limit_alphabet=len(ascii_chars))
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="</s>")
    tokenizer.chat_template = LLAMA2
    return tokenizer


def make_model_dir(out_dir: str | Path, tokenizer: Any, *, seed: int = 0, hidden: int = 32, layers: int = 1,
                   heads: int = 2, arch: str = "llama") -> Path:
    """A tiny random causal LM saved with `tokenizer` as an ordinary HF model directory."""
    from selpo_core.config import ModelConfig
    from selpo_core.models import build_tiny_model, save_model_dir

    cfg = ModelConfig(tiny_arch=arch, tiny_hidden_size=hidden, tiny_layers=layers, tiny_heads=heads, seed=seed)
    return save_model_dir(build_tiny_model(cfg, tokenizer), tokenizer, out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", default="standard", choices=("standard", "conversational", "implicit"))
    args = parser.parse_args(argv)
    print(write_rows(args.out, rows(dialogues(args.rows, seed=args.seed), args.format)))


if __name__ == "__main__":
    main()
