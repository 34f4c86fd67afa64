"""The offline demo (issue 6): its data generator, and a very short run of the whole demo."""

import json
import re

import pytest

import demo
from tasks.data import flatten_squad
from util.demo_data import RELATIONS, generate_squad


def relation_of(question: str) -> str:
    """The relation a generated question asks about."""
    for name, (_, template) in RELATIONS.items():
        pattern = re.escape(template).replace(re.escape("{p}"), ".+").replace(re.escape("{a}"), ".+")
        if re.fullmatch(pattern, question):
            return name
    raise AssertionError(f"question {question!r} matches no template")


def fact_text(relation: str) -> str:
    """The fixed words of a relation's fact sentence between the person and the answer."""
    return RELATIONS[relation][0].split("{v}")[0].split("{p}")[1].split("{a}")[0]


def test_generator_is_deterministic_and_in_squad_format():
    data = generate_squad(30, seed=7)
    assert data == generate_squad(30, seed=7)
    assert data != generate_squad(30, seed=8)
    article = data["data"][0]
    assert set(article) == {"title", "paragraphs"}
    qa = article["paragraphs"][0]["qas"][0]
    assert set(qa) == {"id", "question", "answers"} and set(qa["answers"][0]) == {"text", "answer_start"}
    ids = [qa["id"] for a in data["data"] for p in a["paragraphs"] for qa in p["qas"]]
    assert len(ids) == len(set(ids)) == 60


def test_answers_are_copied_from_the_context_among_distractors():
    for row in flatten_squad(generate_squad(200, seed=3)["data"]):
        context, answer, start = row["context"], row["answers"]["text"][0], row["answers"]["answer_start"][0]
        assert context[start : start + len(answer)] == answer
        assert context.count(". ") >= 4  # several sentences
        # the fact asked about is stated once, among other people's facts
        assert context.count(fact_text(relation_of(row["question"]))) == 1, row
        assert sum(context.count(fact_text(r)) for r in RELATIONS) >= 4


def test_short_demo_run_trains_evaluates_and_reuses_its_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "METHODS", [
        ("full model", {}),
        ("early exit, softmax 0.9", demo.EARLY),
        ("shallow-deep", {"use_shallow_deep": True, "shallow_exit_layer": 1, "shallow2deep_conf_type": "softmax"}),
    ])
    tiny = ["--train_contexts", "40", "--eval_contexts", "3", "--vocab_size", "300", "--d_model", "32", "--d_kv", "8",
            "--d_ff", "64", "--encoder_layers", "1", "--decoder_layers", "2", "--train_steps", "2", "--batch_size", "4",
            "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"), "--threads", "1"]
    first = demo.main(tiny)
    assert first["model_cached"] is False
    results = first["results"]
    assert results["full model"]["eval_block_avg"] == 2.0 and results["full model"]["eval_samples"] == 9
    assert results["early exit, softmax 0.9"]["eval_block_avg"] <= 2.0
    assert "eval_f1" in results["shallow-deep"] and results["shallow-deep"]["eval_block_avg"] >= 1.0
    saved = json.loads((tmp_path / "out" / "demo_results.json").read_text())
    assert saved["results"].keys() == results.keys()
    table = (tmp_path / "out" / "demo_results.md").read_text()
    assert table.startswith("| method | F1 | EM | block_avg") and "early exit, softmax 0.9" in table

    second = demo.main(tiny)
    assert second["model_cached"] is True and second["train_minutes"] == first["train_minutes"]
    assert second["results"]["full model"]["eval_f1"] == results["full model"]["eval_f1"]
    assert "Reusing the cached model" in capsys.readouterr().out
