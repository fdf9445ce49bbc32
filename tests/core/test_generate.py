"""Generation: the transformers backend against a hand-written greedy loop, seeds, stop strings, left padding,
the multi-turn loop (MT-Bench turn 2 follows the model's own turn 1), backend choice, the subprocess
protocol, and `generate_answers` end to end for every benchmark format. Tiny models built in-process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_word_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from selpo_core import generate
from selpo_core.benchmarks_io import BenchmarkPrompt, read_generations
from selpo_core.config import GenerateConfig
from selpo_core.generate import (
    BackendUnavailable,
    Completion,
    SamplingSpec,
    TransformersBackend,
    cut_at_stop,
    generate_answers,
    generate_records,
    pick_backend,
    run_generation_subprocess,
)

WORDS = [f"w{i}" for i in range(60)] + ["user:", "assistant:", "hello", "tell", "me", "more", "about", "it"]
PROMPTS = ["hello", "tell me about w1 w2 w3 w4 w5 w6", "w7 w8", "tell me more about w9 w10 w11", "it"]


def build_tokenizer() -> PreTrainedTokenizerFast:
    return build_word_tokenizer(WORDS)


def save_tiny_model(path: Path, *, seed: int = 0) -> Path:
    """A random 2-layer Llama + word tokenizer saved as an ordinary HF directory."""
    tok = build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        initializer_range=0.3,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def backend(model_dir: Path) -> TransformersBackend:
    # fp32: 'auto' is bf16 on CPUs with fast bf16, and exact comparisons need one precision.
    return TransformersBackend(model_dir, device="cpu", dtype=torch.float32, batch_size=4, progress=False)


def conv(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def manual_greedy(backend: TransformersBackend, conversation: list[dict[str, str]], max_new: int) -> str:
    """Argmax one token at a time on the unpadded prompt: what greedy generation must reproduce."""
    ids = backend.encode(conversation)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            logits = backend.model(input_ids=torch.tensor([ids + new])).logits[0, -1]
            token = int(logits.argmax())
            new.append(token)
            if token in backend.eos_ids:
                break
    return backend.tokenizer.decode(new, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------- sampling


def test_greedy_equals_manual_loop_and_left_padding_changes_nothing(backend: TransformersBackend) -> None:
    spec = SamplingSpec(temperature=0, max_new_tokens=8)
    batched = backend.generate([conv(p) for p in PROMPTS], spec)  # batches of 4 with ragged prompt lengths
    one_by_one = [backend.generate([conv(p)], spec)[0] for p in PROMPTS]
    expected = [manual_greedy(backend, conv(p), 8) for p in PROMPTS]
    assert [row[0].text for row in batched] == expected
    assert [row[0].text for row in one_by_one] == expected
    assert len(set(expected)) > 1, "a degenerate model would make this test vacuous"
    for row in batched:
        assert row[0].finish_reason in ("eos", "length") and 1 <= row[0].n_tokens <= 8


def test_greedy_with_n_repeats_the_one_answer(backend: TransformersBackend) -> None:
    rows = backend.generate([conv("hello")], SamplingSpec(temperature=0, max_new_tokens=6, n=3))
    assert len(rows[0]) == 3 and len({c.text for c in rows[0]}) == 1


def test_same_seed_same_samples_and_caller_rng_untouched(backend: TransformersBackend) -> None:
    spec = SamplingSpec(temperature=1.0, max_new_tokens=10, n=2, seed=3)
    convs = [conv(p) for p in PROMPTS]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = backend.generate(convs, spec)
    assert torch.equal(torch.get_rng_state(), state), "generation must not consume the caller's RNG"
    again = backend.generate(convs, spec)
    other = backend.generate(convs, SamplingSpec(temperature=1.0, max_new_tokens=10, n=2, seed=4))
    texts = [[c.text for c in row] for row in first]
    assert texts == [[c.text for c in row] for row in again]
    assert texts != [[c.text for c in row] for row in other]
    assert all(len(row) == 2 for row in first)
    assert any(row[0] != row[1] for row in texts), "n samples of one prompt should differ"


def test_stop_string_cuts_before_it(backend: TransformersBackend) -> None:
    free = backend.generate([conv("hello")], SamplingSpec(temperature=0, max_new_tokens=12))[0][0]
    words = free.text.split()
    assert len(words) >= 4
    stop = words[2]
    cut = backend.generate([conv("hello")], SamplingSpec(temperature=0, max_new_tokens=12, stop=(stop,)))[0][
        0
    ]
    expected = free.text[: free.text.index(stop)]
    assert cut.text == expected and stop not in cut.text
    assert cut.finish_reason == "stop"
    # Generation stopped at the token that completed the stop string, not at max_new_tokens.
    assert cut.n_tokens == len(expected.split()) + 1


def test_eos_ends_answer_and_is_counted(
    backend: TransformersBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = SamplingSpec(temperature=0, max_new_tokens=8)
    free = backend.generate([conv("hello")], spec)[0][0]
    words = free.text.split()
    assert free.finish_reason == "length" and len(words) == 8
    # Declare the third greedy word an end-of-sequence token: the answer must end just before it.
    monkeypatch.setattr(backend, "eos_ids", [backend.tokenizer.convert_tokens_to_ids(words[2])])
    ended = backend.generate([conv("hello")], spec)[0][0]
    first = words.index(words[2])
    assert ended.finish_reason == "eos"
    assert ended.text.split() == words[:first]  # the EOS token itself is not text
    assert ended.n_tokens == first + 1  # but it was generated


def test_cut_at_stop_takes_earliest() -> None:
    assert cut_at_stop("a b STOP c END", ["END", "STOP"]) == ("a b ", True)
    assert cut_at_stop("a b", ["x"]) == ("a b", False)


# ------------------------------------------------------------------------------------------ multi-turn


class SpyBackend:
    """Records every call; answer text names the turn, sample and question so we can trace conditioning."""

    name = "spy"

    def __init__(self) -> None:
        self.calls: list[tuple[list[list[dict[str, str]]], SamplingSpec]] = []

    def generate(
        self, conversations: list[list[dict[str, str]]], spec: SamplingSpec
    ) -> list[list[Completion]]:
        self.calls.append((conversations, spec))
        turn = (len(conversations[0]) + 1) // 2
        out = []
        for c in conversations:
            base = f"t{turn}:{c[0]['content']}"
            if turn > 1:  # include the conditioning answer, so each sample's turn 2 is traceable
                base += f"|after:{c[-2]['content']}"
            out.append([Completion(f"{base}#{j}", 5, "eos") for j in range(spec.n)])
        return out


MT_QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["q81 first", "q81 second"]},
    {"question_id": 82, "category": "math", "turns": ["q82 first", "q82 second"]},
]


def test_mt_bench_turn_two_follows_own_turn_one() -> None:
    spy = SpyBackend()
    prompts = [BenchmarkPrompt(str(q["question_id"]), q["turns"], q["category"], q) for q in MT_QUESTIONS]
    records = generate_records(spy, prompts, SamplingSpec(n=2, seed=5))
    assert len(spy.calls) == 2
    (first_convs, first_spec), (second_convs, second_spec) = spy.calls
    assert first_convs == [conv("q81 first"), conv("q82 first")] and first_spec.n == 2
    assert second_spec.n == 1 and second_spec.seed != first_spec.seed
    # One conversation per (question, sample): [user t1, assistant <that sample's t1 answer>, user t2].
    assert second_convs[1] == [
        {"role": "user", "content": "q81 first"},
        {"role": "assistant", "content": "t1:q81 first#1"},
        {"role": "user", "content": "q81 second"},
    ]
    assert records[0].answers == [
        ["t1:q81 first#0", "t2:q81 first|after:t1:q81 first#0#0"],
        ["t1:q81 first#1", "t2:q81 first|after:t1:q81 first#1#0"],
    ]
    assert records[1].outputs == [
        "t2:q82 first|after:t1:q82 first#0#0",
        "t2:q82 first|after:t1:q82 first#1#0",
    ]


def test_generate_answers_mt_bench_through_spy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = SpyBackend()
    monkeypatch.setattr(generate, "make_backend", lambda name, model_dir, cfg: spy)
    path = tmp_path / "question.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in MT_QUESTIONS))
    cfg = GenerateConfig(backend="transformers", benchmark="mt_bench", prompts=str(path))
    generate_answers(cfg, tmp_path / "model", str(path), tmp_path / "out", model_name="spy-model")
    rows = [json.loads(line) for line in (tmp_path / "out" / "mt_bench.jsonl").read_text().splitlines()]
    assert rows[0]["choices"][0]["turns"] == ["t1:q81 first#0", "t2:q81 first|after:t1:q81 first#0#0"]


# -------------------------------------------------------------------------------------- backend choice


def _fake_env(monkeypatch: pytest.MonkeyPatch, *, vllm: bool, gpu: bool) -> None:
    real = generate.importlib.util.find_spec
    monkeypatch.setattr(
        generate.importlib.util,
        "find_spec",
        lambda n, *a: object() if vllm and n == "vllm" else (None if n == "vllm" else real(n, *a)),
    )
    monkeypatch.setattr(generate, "_cuda_available", lambda: gpu)
    monkeypatch.setattr(generate.shutil, "which", lambda name: None)


def test_pick_backend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    _fake_env(monkeypatch, vllm=False, gpu=False)
    assert pick_backend("transformers") == "transformers"
    assert pick_backend("auto", vllm_python=str(python)) == "transformers"  # no GPU
    with pytest.raises(BackendUnavailable, match="make vllm-env"):
        pick_backend("vllm", vllm_python=str(python))
    _fake_env(monkeypatch, vllm=True, gpu=True)
    assert pick_backend("auto") == "vllm"
    _fake_env(monkeypatch, vllm=False, gpu=True)
    assert pick_backend("auto", vllm_python=str(python)) == "vllm-subprocess"
    assert pick_backend("vllm", vllm_python=str(python)) == "vllm-subprocess"
    assert pick_backend("auto", vllm_python=str(tmp_path / "missing")) == "transformers"
    with pytest.raises(BackendUnavailable, match="vllm_python") as err:
        pick_backend("vllm", vllm_python=str(tmp_path / "missing"))
    assert "\n" not in str(err.value)


def test_subprocess_protocol_matches_in_process(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI the vLLM venv runs, driven with this interpreter and the transformers backend."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the child inherits it (see one_thread)
    prompts = [BenchmarkPrompt(str(i), [p], "", {"id": i, "prompt": p}) for i, p in enumerate(PROMPTS[:3])]
    spec = SamplingSpec(temperature=0, max_new_tokens=6, stop=("w5",))
    records, seconds = run_generation_subprocess(
        sys.executable, model_dir, prompts, spec, tmp_path, backend="transformers"
    )
    local = generate_records(TransformersBackend(model_dir, progress=False), prompts, spec)
    assert [r.answers for r in records] == [r.answers for r in local]
    assert [r.source for r in records] == [p.source for p in prompts] and seconds > 0


def test_subprocess_failure_is_reported(tmp_path: Path) -> None:
    fake_python = tmp_path / "python"  # a stand-in interpreter that fails the way a broken vLLM venv would
    fake_python.write_text("#!/bin/sh\necho loading model\necho 'CUDA error: out of memory' >&2\nexit 3\n")
    fake_python.chmod(0o755)
    with pytest.raises(RuntimeError, match="exited with 3") as err:
        run_generation_subprocess(
            fake_python, tmp_path, [BenchmarkPrompt("0", ["hello"])], SamplingSpec(), tmp_path
        )
    assert "CUDA error: out of memory" in str(err.value)  # the streamed output's tail explains the failure


# ------------------------------------------------------------------------------------------ end to end


QUESTION_FILES = {
    "plain": ("prompts.jsonl", [{"id": 7, "prompt": "hello"}, {"id": 8, "prompt": "tell me about w1"}]),
    "alpaca_eval": (
        "alpaca.json",
        [
            {"instruction": "hello", "dataset": "helpful_base"},
            {"instruction": "tell me about w1", "dataset": "oasst"},
        ],
    ),
    "arena_hard": (
        "question.jsonl",
        [
            {
                "question_id": "a1b2",
                "category": "arena-hard-v0.1",
                "cluster": "c",
                "turns": [{"content": "hello"}],
            },
            {
                "question_id": "c3d4",
                "category": "arena-hard-v0.1",
                "cluster": "c",
                "turns": [{"content": "w7 w8"}],
            },
        ],
    ),
    "mt_bench": ("question.jsonl", MT_QUESTIONS),
}


@pytest.mark.parametrize("bench", list(QUESTION_FILES))
def test_generate_answers_writes_every_format(bench: str, model_dir: Path, tmp_path: Path) -> None:
    name, rows = QUESTION_FILES[bench]
    path = tmp_path / name
    text = json.dumps(rows) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text)
    cfg = GenerateConfig(
        backend="transformers",
        benchmark=bench,
        prompts=str(path),
        temperature=1.0,
        max_new_tokens=5,
        n=2,
        seed=1,
        batch_size=2,
    )
    out = tmp_path / "out"
    stats = generate_answers(cfg, model_dir, str(path), out, model_name="tiny-policy")

    assert set(stats) == {
        "backend",
        "n_prompts",
        "tokens_per_second",
        "seconds",
        "mean_answer_tokens",
        "files",
    }
    assert stats["backend"] == "transformers" and stats["n_prompts"] == 2
    assert stats["tokens_per_second"] > 0 and 1 <= stats["mean_answer_tokens"] <= 5
    records = read_generations(out / "generations.jsonl")
    lines = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    n_turns = 2 if bench == "mt_bench" else 1
    for line, row in zip(lines, rows, strict=True):
        assert set(line) == {
            "id",
            "category",
            "turns",
            "outputs",
            "answers",
            "n_tokens",
            "finish_reasons",
            "generator",
            "source",
        }
        assert line["generator"] == "tiny-policy" and line["source"] == row
        assert len(line["answers"]) == 2 and all(len(sample) == n_turns for sample in line["answers"])
        assert line["outputs"] == [sample[-1] for sample in line["answers"]]
        assert all(r in ("eos", "stop", "length") for s in line["finish_reasons"] for r in s)

    if bench == "plain":
        assert stats["files"] == ["generations.jsonl"]
        assert [r.id for r in records] == ["7", "8"]
    elif bench == "alpaca_eval":
        outputs = json.loads((out / "alpaca_eval.json").read_text())
        assert isinstance(outputs, list) and len(outputs) == 2
        for entry, row, record in zip(outputs, rows, records, strict=True):
            assert set(entry) == {"instruction", "output", "generator", "dataset"}
            assert entry["instruction"] == row["instruction"] and entry["dataset"] == row["dataset"]
            assert entry["output"] == record.answers[0][0] and entry["generator"] == "tiny-policy"
    else:
        answers = [json.loads(line) for line in (out / f"{bench}.jsonl").read_text().splitlines()]
        for entry, row, record in zip(answers, rows, records, strict=True):
            assert set(entry) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
            assert entry["question_id"] == row["question_id"]  # original type: int for MT-Bench
            assert type(entry["question_id"]) is type(row["question_id"])
            assert entry["model_id"] == "tiny-policy" and isinstance(entry["tstamp"], float)
            assert isinstance(entry["answer_id"], str) and len(entry["answer_id"]) == 22
            assert [c["index"] for c in entry["choices"]] == [0, 1]
            for choice, sample, counts in zip(entry["choices"], record.answers, record.n_tokens, strict=True):
                assert set(choice) == {"index", "turns"}
                if bench == "arena_hard":
                    assert choice["turns"] == [{"content": a, "token_len": n} for a, n in zip(sample, counts)]
                else:
                    assert choice["turns"] == sample and len(sample) == 2


# ------------------------------------------------------------------------------------------------ vLLM


@pytest.mark.gpu
def test_vllm_backend_samples_reproducibly(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs CUDA")
    from selpo_core.generate import VLLMBackend

    tok = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        vocab_size=len(tok),
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(
        tmp_path
    )  # head_dim 64: every attention kernel
    tok.save_pretrained(tmp_path)
    llm = VLLMBackend(tmp_path, seed=0, max_model_len=256, gpu_memory_utilization=0.3)
    convs = [conv(p) for p in PROMPTS]
    spec = SamplingSpec(temperature=1.0, max_new_tokens=8, n=2, seed=7)
    first, again = llm.generate(convs, spec), llm.generate(convs, spec)
    assert [[c.text for c in row] for row in first] == [[c.text for c in row] for row in again]
    assert all(len(row) == 2 for row in first)
    greedy = llm.generate(convs, SamplingSpec(temperature=0, max_new_tokens=8, n=2))
    assert all(row[0] == row[1] for row in greedy)
    words = greedy[0][0].text.split()
    if len(words) >= 3:
        cut = llm.generate(convs[:1], SamplingSpec(temperature=0, max_new_tokens=8, stop=(words[2],)))[0][0]
        assert words[2] not in cut.text and cut.finish_reason == "stop"


@pytest.mark.gpu
def test_transformers_backend_on_cuda(model_dir: Path, backend: TransformersBackend) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gpu = TransformersBackend(model_dir, device="cuda", dtype=torch.float32, batch_size=4, progress=False)
    greedy = SamplingSpec(temperature=0, max_new_tokens=8)
    batched = [row[0].text for row in gpu.generate([conv(p) for p in PROMPTS], greedy)]
    assert batched == [gpu.generate([conv(p)], greedy)[0][0].text for p in PROMPTS]
    assert batched == [row[0].text for row in backend.generate([conv(p) for p in PROMPTS], greedy)]  # = CPU
    spec = SamplingSpec(temperature=1.0, max_new_tokens=8, n=2, seed=3)
    state = torch.cuda.get_rng_state()
    first = [[c.text for c in row] for row in gpu.generate([conv(p) for p in PROMPTS], spec)]
    assert torch.equal(torch.cuda.get_rng_state(), state), "generation must not consume the caller's CUDA RNG"
    assert first == [[c.text for c in row] for row in gpu.generate([conv(p) for p in PROMPTS], spec)]
