"""VLLMBackend for real (one engine, in the vLLM venv) against the transformers backend (here), fp32:
greedy answers token for token, seeded sampling, n samples, stop strings, max_new_tokens, finish reasons,
MT-Bench's turn 2 conditioned on the model's own turn 1, the head-size check, the backend choice."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from vllm_helpers import (
    prompt_texts,
    run_driver_fixture,  # noqa: F401  (fixtures, by name)
    save_tiny_model,
    vllm_python_fixture,  # noqa: F401
)

from selpo_core.benchmark_formats import mt_bench_temperature
from selpo_core.benchmarks_io import BenchmarkPrompt
from selpo_core.generate import TransformersBackend, generate_records, pick_backend
from selpo_core.generate_spec import SamplingSpec

pytestmark = pytest.mark.vllm

N_PROMPTS = 24
GREEDY = SamplingSpec(temperature=0, max_new_tokens=24)


def conv(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def rows_of(completions: list[list[Any]]) -> list[list[dict[str, Any]]]:
    return [[{"text": c.text, "n_tokens": c.n_tokens, "finish_reason": c.finish_reason,
              "token_ids": list(c.token_ids)} for c in row] for row in completions]


def pick_eos_token(answers: list[list[int]]) -> int:
    """A token some greedy answers emit (not first) and others never do: as EOS it ends some answers only."""
    seen = Counter(t for ids in answers for t in set(ids[1:]))
    fits = [t for t, n in seen.most_common() if len(answers) // 5 <= n <= len(answers) // 2]
    assert fits, f"no token fits as an extra EOS in {answers}"
    return fits[0]


def pick_stop_word(texts: list[str]) -> str:
    seen = Counter(w for text in texts for w in set(text.split()[1:]))
    fits = [w for w, n in seen.most_common() if 2 <= n <= len(texts) // 2]
    assert fits, f"no word fits as a stop string in {texts}"
    return fits[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, run_driver: Any) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("vllm-generate")
    prompts = prompt_texts(N_PROMPTS)
    convs = [conv(p) for p in prompts]
    model = save_tiny_model(root / "model")
    plain = TransformersBackend(model, device="cpu", dtype=torch.float32, batch_size=8, progress=False)
    eos = pick_eos_token([list(r[0].token_ids) for r in plain.generate(convs, GREEDY)])
    model = save_tiny_model(root / "model", eos_extra=[eos])  # same weights; some answers now end with EOS
    hf = TransformersBackend(model, device="cpu", dtype=torch.float32, batch_size=8, progress=False)
    greedy = hf.generate(convs, GREEDY)
    stop = SamplingSpec(temperature=0, max_new_tokens=24, stop=(pick_stop_word([r[0].text for r in greedy]),))
    short = SamplingSpec(temperature=0, max_new_tokens=3)
    mt_prompts = [BenchmarkPrompt(str(81 + i), [prompts[2 * i], prompts[2 * i + 1]], category,
                                  {"question_id": 81 + i, "category": category})
                  for i, category in enumerate(("math", "writing", "reasoning", "roleplay"))]
    mt_spec = SamplingSpec(temperature=1.0, max_new_tokens=12, n=2, seed=5)
    mt_temperatures = [mt_bench_temperature(p.category) for p in mt_prompts]
    bad = save_tiny_model(root / "head16", tiny_hidden_size=64, tiny_heads=4)
    cases = {
        "greedy": (convs, GREEDY),
        "greedy_n3": (convs[:4], SamplingSpec(temperature=0, max_new_tokens=8, n=3)),
        "sampled": (convs, SamplingSpec(temperature=1.0, max_new_tokens=16, n=3, seed=7)),
        "sampled_seed8": (convs, SamplingSpec(temperature=1.0, max_new_tokens=16, n=3, seed=8)),
        "stop": (convs, stop),
        "short": (convs, short),
    }
    job = {
        "model": str(model), "options": {"precision": "fp32", "seed": 0},
        "cases": [{"name": name, "conversations": c, "spec": json.loads(spec.to_json())}
                  for name, (c, spec) in cases.items()],
        "repeat": ["sampled"], "unsupported_models": [str(bad)], "probe": prompts[0],
        "mt_bench": {"prompts": [p.__dict__ for p in mt_prompts], "spec": json.loads(mt_spec.to_json()),
                     "temperatures": mt_temperatures},
    }
    result = run_driver(job)
    expected = {"greedy": rows_of(greedy), "stop": rows_of(hf.generate(convs, stop)),
                "short": rows_of(hf.generate(convs, short)),
                "mt_bench": generate_records(hf, mt_prompts, mt_spec, temperatures=mt_temperatures)}
    return {"result": result, "expected": expected, "model": model, "bad": bad, "stop": stop.stop[0],
            "eos": eos, "mt_prompts": mt_prompts, "probe": prompts[0], "tokenizer": hf.tokenizer}


def test_engine_runs_fp32_on_this_host(run: dict[str, Any]) -> None:
    result = run["result"]
    assert result["dtype"] == "float32" and result["device"] in ("cpu", "cuda") and result["start_seconds"] > 0


def test_vllm_uses_the_saved_tokenizer(run: dict[str, Any]) -> None:
    """A qwen2 dir's generic word-level tokenizer: transformers 5 would rebuild it as a BPE for vLLM, whose stop
    strings then matched across words (its decode glued them together); selpo hands vLLM the saved one."""
    tokenizer, probe = run["tokenizer"], run["probe"]
    assert run["result"]["probe_ids"] == tokenizer(probe, add_special_tokens=False)["input_ids"]
    assert run["result"]["probe_text"] == probe == tokenizer.decode(run["result"]["probe_ids"])


def test_greedy_answers_equal_transformers_token_for_token(run: dict[str, Any]) -> None:
    got, expected = run["result"]["cases"]["greedy"]["rows"], run["expected"]["greedy"]
    agree = sum(g[0]["token_ids"] == e[0]["token_ids"] for g, e in zip(got, expected, strict=True))
    assert agree == N_PROMPTS >= 16, f"{agree}/{N_PROMPTS} greedy answers agree token for token"
    assert got == expected  # and so text, token counts and finish reasons
    assert len({row[0]["text"] for row in got}) > N_PROMPTS // 3, "a degenerate model would make this vacuous"
    reasons = Counter(row[0]["finish_reason"] for row in got)
    assert reasons["eos"] > 0 and reasons["length"] > 0, reasons
    for row in got:
        ids = row[0]["token_ids"]
        if row[0]["finish_reason"] == "eos":  # EOS is generated (counted) but not text
            assert ids[-1] == run["eos"] and row[0]["n_tokens"] == len(ids) <= 24
        else:
            assert row[0]["n_tokens"] == len(ids) == 24


def test_greedy_with_n_repeats_the_one_answer(run: dict[str, Any]) -> None:
    rows = run["result"]["cases"]["greedy_n3"]["rows"]
    assert [len(row) for row in rows] == [3] * 4
    assert all(row[0] == row[1] == row[2] for row in rows)
    assert [row[0]["token_ids"] for row in rows] == [e[0]["token_ids"][:8] for e in run["expected"]["greedy"][:4]]


def test_seeded_sampling_reproduces_and_gives_n_samples(run: dict[str, Any]) -> None:
    first = run["result"]["cases"]["sampled"]["rows"]
    again = run["result"]["repeats"]["sampled"]["rows"]
    other = run["result"]["cases"]["sampled_seed8"]["rows"]
    assert first == again, "the same seed must give the same samples"
    assert first != other, "another seed must give other samples"
    assert all(len(row) == 3 for row in first)
    assert sum(len({c["text"] for c in row}) > 1 for row in first) > N_PROMPTS // 2, "n samples should differ"
    assert all(1 <= c["n_tokens"] <= 16 and c["finish_reason"] in ("eos", "length") for row in first for c in row)


def test_stop_strings_cut_like_transformers(run: dict[str, Any]) -> None:
    got, expected = run["result"]["cases"]["stop"]["rows"], run["expected"]["stop"]
    assert got == expected
    stopped = [row[0] for row in got if row[0]["finish_reason"] == "stop"]
    assert len(stopped) >= 2
    for row, free in zip(got, run["expected"]["greedy"], strict=True):
        assert run["stop"] not in row[0]["text"]
        if row[0]["finish_reason"] == "stop":  # ends at the token that completed the stop string
            assert row[0]["token_ids"] == free[0]["token_ids"][: row[0]["n_tokens"]]
            assert free[0]["text"].startswith(row[0]["text"])


def test_max_new_tokens_and_finish_reasons(run: dict[str, Any]) -> None:
    got = run["result"]["cases"]["short"]["rows"]
    assert got == run["expected"]["short"]
    assert all(row[0]["n_tokens"] <= 3 for row in got)
    assert all(row[0]["finish_reason"] == "length" for row in got if run["eos"] not in row[0]["token_ids"])
    assert {"length"} <= {row[0]["finish_reason"] for row in got}


def test_mt_bench_turn_two_follows_the_models_own_turn_one(run: dict[str, Any]) -> None:
    mt = run["result"]["mt_bench"]
    records = {r["id"]: r for r in mt["records"]}
    prompts = {p.id: p for p in run["mt_prompts"]}
    turn_two = [call for call in mt["calls"] if len(call["conversations"][0]) == 3]
    assert turn_two, "no second-turn calls were made"
    for call in turn_two:
        samples: Counter[str] = Counter()
        for conversation in call["conversations"]:
            qid = next(i for i, p in prompts.items() if p.turns[0] == conversation[0]["content"])
            j = samples[qid]
            samples[qid] += 1
            # [user turn 1, THIS sample's own turn-1 answer, user turn 2]
            assert conversation == [{"role": "user", "content": prompts[qid].turns[0]},
                                    {"role": "assistant", "content": records[qid]["answers"][j][0]},
                                    {"role": "user", "content": prompts[qid].turns[1]}]
    # FastChat's temperatures: math and reasoning greedy (both samples alike, and equal to transformers' whole
    # two-turn chain, which only holds if turn 2 saw turn 1's answer), writing and roleplay sampled at 0.7.
    expected = {r.id: r for r in run["expected"]["mt_bench"]}
    temperatures = {call["spec"]["temperature"] for call in mt["calls"]}
    assert temperatures == {0.0, 0.7}
    for qid, record in records.items():
        if prompts[qid].category in ("math", "reasoning"):
            assert record["answers"] == expected[qid].answers and record["answers"][0] == record["answers"][1]
    sampled = [records[q]["answers"] for q, p in prompts.items() if p.category in ("writing", "roleplay")]
    assert any(a[0][0] != a[1][0] for a in sampled), "the two samples' turn-1 answers should differ somewhere"


def test_unsupported_head_size_fails_before_the_engine_starts(run: dict[str, Any]) -> None:
    outcome = run["result"]["unsupported"][str(run["bad"])]
    if run["result"]["device"] == "cuda":
        assert outcome["error"] is None  # vLLM picks a GPU attention backend that takes head size 16
        return
    message = outcome["error"]
    assert message is not None and "\n" not in message
    assert "head size 16" in message and "32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512" in message


def test_auto_picks_vllm_when_the_venv_exists(run: dict[str, Any], vllm_python: Path) -> None:
    choice = pick_backend("auto", vllm_python=str(vllm_python), model_dir=run["model"])
    assert (choice.name, choice.label) == ("vllm-subprocess", "vllm") and choice.python == vllm_python
    fallback = pick_backend("auto", vllm_python=str(vllm_python), model_dir=run["bad"])
    assert fallback.name == ("vllm-subprocess" if choice.device == "cuda" else "transformers")
