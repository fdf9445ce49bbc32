"""The built-in task with known token rewards (docs/SYNTHETIC.md).

A response is a sequence of words. Filler words are worth 0, positive key words +1, negative key words -1
(or graded: `positive_rewards` / `negative_rewards` give several magnitudes, spread evenly over the key
words), and the true reward of a response is the sum. Because the per-word truth is known, every later stage can be
checked against it: oracle token rewards (AUROC against key-word membership), selection precision, and the
true-reward gain of the trained policy.

Everything is drawn from `random.Random` streams seeded by `(cfg.seed, purpose)`, so the same config writes
byte-identical files, and changing, say, `n_sft` does not reshuffle the vocabulary or the pairs.

Pairs are two samples of the SAME generator that writes the SFT corpus. The SFT reference imitates that
generator, so the pairs are (close to) on-policy for it: the oracle's log-ratio against the reference then
measures preference, not a distribution shift between corpus and pairs.

The task directory (docs/CONTRACTS.md) uses the same formats as any user data, so later stages do not know
the data is synthetic; only evaluation reads `task.json` through `GroundTruth`.
"""

from __future__ import annotations

import bisect
import itertools
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selpo_core.config import ConfigError, SyntheticConfig, to_dict

if TYPE_CHECKING:  # transformers is heavy; GroundTruth users should not pay for it
    from transformers import PreTrainedTokenizerFast

TASK_FORMAT = "selpo-synthetic/1"

# Prompts read like instructions; the {thing} (topic) decides which fillers are likely in the answer.
PLACE_TEMPLATES = (
    "describe the {thing} in the {place}",
    "tell me about the {thing} in the {place}",
    "write a short note on the {thing} near the {place}",
    "what do you think of the {thing} at the {place}",
)
# Topic-only prompts stay in training, so every topic is seen in training whatever is held out.
THING_TEMPLATES = ("tell me about the {thing}", "explain the {thing}")
THINGS = (
    "weather", "market", "garden", "music", "festival", "food",
    "traffic", "buildings", "history", "people", "wildlife", "sports",
)
PLACES = ("city", "village", "valley", "coast", "mountains", "island", "capital", "desert")

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)

P_TOPIC = 0.8
"""Probability that a filler word comes from the prompt topic's preferred subset (else any filler)."""
TOPIC_SHARE = 0.125
"""Size of a topic's preferred filler subset, as a fraction of all fillers."""

# Pronounceable pseudo-words: 2-3 consonant-vowel syllables (75 syllables -> >400k distinct words).
_SYLLABLES = tuple(c + v for c in "bdfghklmnprstvz" for v in "aeiou")

# The split of the tokenizer's Whitespace pre-tokenizer, so GroundTruth's words are the tokenizer's words.
WORD_PATTERN = re.compile(r"\w+|[^\w\s]+")

# Every message content, joined by one space, no role markup: a rendered one-message chat prompt IS the raw
# prompt, so SFT, preference training and generation all see the same tokens. Assistant turns are kept (not
# dropped) so conversational pairs render to "prompt response" like standard ones.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first %} {% endif -%}"
    "{{ message['content'] }}"
    "{%- endfor -%}"
)


@dataclass(frozen=True)
class Prompt:
    text: str
    thing: str


@dataclass(frozen=True)
class Vocabulary:
    filler: tuple[str, ...]
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    topic_fillers: dict[str, tuple[str, ...]]
    """Each topic's preferred subset of fillers (what an SFT model can learn from the prompt)."""

    @property
    def prompt_words(self) -> tuple[str, ...]:
        words = {w for t in PLACE_TEMPLATES + THING_TEMPLATES for w in WORD_PATTERN.findall(t)}
        words |= set(THINGS) | set(PLACES)
        words -= {"thing", "place"}  # template slot names, not words of any prompt
        return tuple(sorted(words))

    @property
    def tokens(self) -> tuple[str, ...]:
        """Token strings in id order: specials, prompt words, fillers, positive, negative key words."""
        return SPECIAL_TOKENS + self.prompt_words + self.filler + self.positive + self.negative


def _rng(cfg: SyntheticConfig, purpose: str) -> random.Random:
    # A str seed is hashed with SHA-512 by `random` (independent of PYTHONHASHSEED): stable across runs.
    return random.Random(f"selpo-synthetic:{cfg.seed}:{purpose}")


def make_vocabulary(cfg: SyntheticConfig) -> Vocabulary:
    """Distinct lowercase pseudo-words for fillers and key words, and each topic's preferred fillers."""
    rng = _rng(cfg, "vocab")
    reserved = {w for t in PLACE_TEMPLATES + THING_TEMPLATES for w in WORD_PATTERN.findall(t)}
    reserved |= set(THINGS) | set(PLACES)  # e.g. "note" is also a CV-CV pseudo-word
    total = cfg.n_filler + cfg.n_positive + cfg.n_negative
    words: list[str] = []
    seen: set[str] = set()
    for _ in range(100 * total):
        if len(words) == total:
            break
        word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 2, 3))))
        if word not in seen and word not in reserved:
            seen.add(word)
            words.append(word)
    if len(words) < total:
        raise ConfigError(f"synthetic: could not draw {total} distinct pseudo-words; use fewer words")
    filler = tuple(words[: cfg.n_filler])
    positive = tuple(words[cfg.n_filler : cfg.n_filler + cfg.n_positive])
    negative = tuple(words[cfg.n_filler + cfg.n_positive :])
    topic_rng = _rng(cfg, "topics")
    k = max(1, round(TOPIC_SHARE * len(filler)))
    topic_fillers = {thing: tuple(topic_rng.sample(filler, k)) for thing in THINGS}
    return Vocabulary(filler, positive, negative, topic_fillers)


def make_prompts(cfg: SyntheticConfig) -> tuple[list[Prompt], list[Prompt]]:
    """(training prompts, held-out prompts). Held-out ones are whole (template, topic, place) combinations
    no training prompt uses, drawn only from place templates so every topic keeps training prompts."""
    place_prompts = [
        Prompt(t.format(thing=thing, place=place), thing)
        for t, thing, place in itertools.product(PLACE_TEMPLATES, THINGS, PLACES)
    ]
    thing_prompts = [
        Prompt(t.format(thing=thing), thing) for t, thing in itertools.product(THING_TEMPLATES, THINGS)
    ]
    limit = len(place_prompts) // 2
    if cfg.n_heldout_prompts > limit:
        raise ConfigError(
            f"synthetic.n_heldout_prompts={cfg.n_heldout_prompts} must be <= {limit} "
            f"(half of the {len(place_prompts)} template/topic/place prompts; the rest are for training)"
        )
    heldout = _rng(cfg, "prompts").sample(place_prompts, cfg.n_heldout_prompts)
    held = {p.text for p in heldout}
    train = [p for p in place_prompts + thing_prompts if p.text not in held]
    return train, heldout


def sample_response(rng: random.Random, vocab: Vocabulary, thing: str, cfg: SyntheticConfig) -> list[str]:
    """One response of the generator the SFT reference imitates (and the pairs are drawn from)."""
    preferred = vocab.topic_fillers[thing]
    words = []
    for _ in range(rng.randint(cfg.min_words, cfg.max_words)):
        if rng.random() < cfg.p_key:
            words.append(rng.choice(vocab.positive if rng.random() < 0.5 else vocab.negative))
        else:
            words.append(rng.choice(preferred if rng.random() < P_TOPIC else vocab.filler))
    return words


def build_tokenizer(vocab: Vocabulary) -> PreTrainedTokenizerFast:
    """A word-level HF fast tokenizer (offsets work) that reloads with AutoTokenizer.from_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ids = {token: i for i, token in enumerate(vocab.tokens)}
    backend = Tokenizer(models.WordLevel(ids, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # No post-processor: BOS is not prepended, so token i of a response is word i (offsets = word spans).
    # No decoder: tokenizers then joins tokens with single spaces, which is exactly our response text.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS,
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def key_word_rewards(cfg: SyntheticConfig, vocab: Vocabulary) -> dict[str, float]:
    """The true reward of every key word: key word i of a sign gets that sign's rewards[i % len] (filler: 0)."""
    positive = cfg.positive_rewards
    negative = cfg.negative_rewards
    return ({w: positive[i % len(positive)] for i, w in enumerate(vocab.positive)}
            | {w: negative[i % len(negative)] for i, w in enumerate(vocab.negative)})


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_task(cfg: SyntheticConfig, out_dir: Path) -> dict[str, int]:
    """Write the task directory (docs/CONTRACTS.md) into `out_dir`; returns the counts also in task.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = make_vocabulary(cfg)
    train_prompts, heldout = make_prompts(cfg)
    rewards = key_word_rewards(cfg, vocab)

    sft_rng = _rng(cfg, "sft")
    sft_rows = []
    for _ in range(cfg.n_sft):
        prompt = sft_rng.choice(train_prompts)
        completion = " ".join(sample_response(sft_rng, vocab, prompt.thing, cfg))
        sft_rows.append({"prompt": prompt.text, "completion": completion})

    pair_rng = _rng(cfg, "pairs")
    pair_rows, truth_rows, ties = [], [], 0
    for _ in range(cfg.n_pairs):
        prompt = pair_rng.choice(train_prompts)
        a, b = (sample_response(pair_rng, vocab, prompt.thing, cfg) for _ in range(2))
        ra, rb = ([rewards.get(w, 0.0) for w in words] for words in (a, b))
        if sum(ra) == sum(rb):  # a tie has no preference to learn: drop it (deterministic labels)
            ties += 1
            continue
        (chosen, r_chosen), (rejected, r_rejected) = sorted(((a, ra), (b, rb)), key=lambda s: -sum(s[1]))
        pair_rows.append({"prompt": prompt.text, "chosen": " ".join(chosen), "rejected": " ".join(rejected)})
        truth_rows.append({
            "prompt": prompt.text,
            "chosen_word_rewards": r_chosen,
            "rejected_word_rewards": r_rejected,
            "chosen_reward": sum(r_chosen),
            "rejected_reward": sum(r_rejected),
        })

    counts = {
        "vocab_size": len(vocab.tokens),
        "n_sft": len(sft_rows),
        "n_pairs": len(pair_rows),
        "n_ties_dropped": ties,
        "n_train_prompts": len(train_prompts),
        "n_heldout_prompts": len(heldout),
    }
    n = max(1, len(truth_rows))
    task = {
        "format": TASK_FORMAT,
        "config": to_dict(cfg),
        "words": {
            "filler": list(vocab.filler), "positive": list(vocab.positive), "negative": list(vocab.negative)
        },
        "word_rewards": rewards,  # words not listed are worth 0
        "topics": {thing: list(fillers) for thing, fillers in vocab.topic_fillers.items()},
        "templates": list(PLACE_TEMPLATES + THING_TEMPLATES),
        "places": list(PLACES),
        "p_topic": P_TOPIC,
        "counts": counts,
        "stats": {  # what evaluation compares the reference and policies against
            "mean_chosen_reward": round(sum(r["chosen_reward"] for r in truth_rows) / n, 6),
            "mean_rejected_reward": round(sum(r["rejected_reward"] for r in truth_rows) / n, 6),
        },
    }
    build_tokenizer(vocab).save_pretrained(str(out_dir / "tokenizer"))
    (out_dir / "sft.jsonl").write_text(_jsonl(sft_rows), encoding="utf-8")
    (out_dir / "pairs.jsonl").write_text(_jsonl(pair_rows), encoding="utf-8")
    (out_dir / "truth.jsonl").write_text(_jsonl(truth_rows), encoding="utf-8")
    prompt_rows = [{"id": i, "prompt": p.text} for i, p in enumerate(heldout)]
    (out_dir / "prompts.jsonl").write_text(_jsonl(prompt_rows), encoding="utf-8")
    (out_dir / "task.json").write_text(json.dumps(task, indent=1) + "\n", encoding="utf-8")
    return counts


@dataclass(frozen=True)
class GroundTruth:
    """The true per-word rewards of a task directory, applied to any text (e.g. a policy's generations)."""

    word_rewards: dict[str, float]

    @classmethod
    def load(cls, task_dir: str | Path) -> GroundTruth:
        path = Path(task_dir) / "task.json"
        try:
            task = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} does not exist: not a synthetic task directory") from None
        if task.get("format") != TASK_FORMAT:
            raise ValueError(f"{path} has format {task.get('format')!r}, expected {TASK_FORMAT!r}")
        return cls({str(w): float(r) for w, r in task["word_rewards"].items()})

    def word_reward(self, word: str) -> float:
        return self.word_rewards.get(word, 0.0)

    def token_rewards(self, text: str) -> list[tuple[int, int, float]]:
        """(start, end, reward) of every word of `text`, split the way the task tokenizer splits."""
        return [(m.start(), m.end(), self.word_reward(m.group())) for m in WORD_PATTERN.finditer(text)]

    def reward(self, text: str) -> float:
        return sum(r for _, _, r in self.token_rewards(text))

    def key_labels(self, offsets: Sequence[Sequence[int]], text: str) -> list[int]:
        """+1 / -1 / 0 per token character span `(start, end)` of `text`: the sign of the word it overlaps
        most (any tokenizer's offsets work, e.g. a subword policy's). Empty spans (EOS) are 0."""
        words = self.token_rewards(text)
        starts = [s for s, _, _ in words]
        labels = []
        for start, end in ((int(s), int(e)) for s, e in offsets):
            best, best_overlap = 0.0, 0
            # Words are sorted and disjoint: walk back from the last word starting before `end`.
            i = bisect.bisect_left(starts, end) - 1
            while i >= 0 and words[i][1] > start:
                overlap = min(end, words[i][1]) - max(start, words[i][0])
                if overlap >= best_overlap and overlap > 0:  # >=: ties go to the earlier word
                    best, best_overlap = words[i][2], overlap
                i -= 1
            labels.append(1 if best > 0 else -1 if best < 0 else 0)
        return labels


__all__ = [
    "SPECIAL_TOKENS", "CHAT_TEMPLATE", "WORD_PATTERN", "Prompt", "Vocabulary", "make_vocabulary",
    "make_prompts", "sample_response", "build_tokenizer", "key_word_rewards", "write_task", "GroundTruth",
]
