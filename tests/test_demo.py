"""The offline demo (issues 6 and 15): its data generators, the per-token view of exit layers,
and a very short run of the whole demo."""

import json
import re

import pytest

import demo
from tasks.data import flatten_squad
from util.demo_data import BIO_RELATIONS, BIO_STYLES, RELATIONS, generate_bios, generate_squad
from util.toy_models import train_toy_tokenizer


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


# ----- data-to-text ------------------------------------------------------------------------------------
def parse_record(record: str) -> dict:
    fields = dict(field.split(": ", 1) for field in record.split(" ; "))
    return fields


def test_bio_generator_is_deterministic_with_summarization_columns():
    rows = generate_bios(50, seed=7)
    assert rows == generate_bios(50, seed=7)
    assert rows != generate_bios(50, seed=8)
    assert all(set(row) == {"id", "text", "summary"} for row in rows)
    assert len({row["id"] for row in rows}) == 50
    with pytest.raises(ValueError, match="min_facts"):
        generate_bios(5, min_facts=4, max_facts=3)


def test_bio_text_states_every_fact_of_its_record_in_the_style_and_fixed_order():
    orders = set()
    for row in generate_bios(300, seed=3):
        fields = parse_record(row["text"])
        name, style = fields.pop("name"), BIO_STYLES.index(fields.pop("style"))
        assert 4 <= len(fields) <= 5 and set(fields) <= set(BIO_RELATIONS)
        orders.add(tuple(fields))
        surname = name.split()[1]
        expected = []
        for relation in BIO_RELATIONS:  # the text follows the fixed order, whatever the record's
            if relation in fields:
                value = fields[relation]
                article = "an" if value[0] in "aeiou" else "a"
                person = name if not expected else surname
                expected.append(BIO_RELATIONS[relation][style].format(p=person, v=value, a=article))
        assert row["summary"] == " ".join(expected)
        words = re.findall(r"\w+", row["summary"])
        assert row["summary"].count(name) == 1 and words.count(surname) == len(fields)
    assert len(orders) > 100  # the record's fields come in many orders


def test_bio_texts_are_20_to_60_tokens_with_the_demo_tokenizer():
    settings = demo.BioSettings()
    train = generate_bios(3000, seed=settings.seed)
    tokenizer = train_toy_tokenizer([r["text"] for r in train] + [r["summary"] for r in train],
                                    vocab_size=settings.vocab_size)
    lengths = [len(tokenizer(r["summary"]).input_ids) - 1 for r in generate_bios(500, seed=settings.seed + 1)]
    assert 20 <= min(lengths) and max(lengths) <= 60  # eos left out
    assert sum(lengths) / len(lengths) > 25
    assert all(len(r["summary"].split()) >= 20 for r in train)


# ----- the per-token view --------------------------------------------------------------------------------
def test_exit_view_puts_each_layer_beneath_its_token_and_wraps():
    pieces, layers = ["▁Kora", "▁Vin", "tel", "▁was", "</s>"], [3, 8, 1, 1, 2]
    text = demo.exit_view_text(pieces, layers, num_layers=8, colour=False)
    top, bottom = text.split("\n")
    assert top.split() == ["Kora", "Vin", "##tel", "was", "</s>"]
    assert bottom.split() == ["3", "8", "1", "1", "2"]
    for piece, layer in zip(top.split(), bottom.split()):  # each number starts under its token
        assert bottom.index(layer, top.index(piece)) == top.index(piece)
    coloured = demo.exit_view_text(pieces, layers, num_layers=8, colour=True)
    assert coloured.count("\x1b[38;5;") == 5
    assert "\x1b[38;5;46mKora" not in coloured and "\x1b[38;5;46mwas" in coloured  # layer 1 green, 3 not
    wrapped = demo.exit_view_text(pieces * 10, layers * 10, num_layers=8, colour=False, width=30)
    assert all(len(line) <= 30 for line in wrapped.split("\n"))
    assert len(wrapped.split("\n\n")) > 3
    with pytest.raises(ValueError, match="5 tokens but 4 exit layers"):
        demo.exit_view_text(pieces, layers[:4], num_layers=8, colour=False)


def test_exit_view_html_marks_every_token_with_its_layer():
    page = demo.exit_view_html([{"source": "name: A <B>", "pieces": ["▁Kora", "tel", "</s>"],
                                 "exit_layers": [1, 8, 2]}], num_layers=8, title="view")
    assert "name: A &lt;B&gt;" in page and "&lt;/s&gt;<sub>2</sub>" in page
    assert re.search(r'background:#1a9850" title="layer 1">Kora<sub>1</sub>', page)
    assert re.search(r'background:#d73027" title="layer 8">tel<sub>8</sub>', page)
    # a word's pieces touch (no whitespace between spans); a new word's piece is set apart
    assert re.search(r'Kora<sub>1</sub></span><span class="t" [^>]*>tel', page)
    assert re.search(r'tel<sub>8</sub></span><span class="t w" [^>]*>&lt;/s&gt;', page)


# ----- a short run ----------------------------------------------------------------------------------------
TINY = ["--vocab_size", "300", "--d_model", "32", "--d_kv", "8", "--d_ff", "64", "--encoder_layers", "1",
        "--decoder_layers", "2", "--train_steps", "2", "--batch_size", "4", "--threads", "1",
        "--eval_batch_size", "2", "--timing_samples", "2", "--timing_rounds", "2"]


def tiny_rows(monkeypatch):
    monkeypatch.setattr(demo, "DEMO_ROWS", [
        ("full model", "full", {}, {}),
        ("early exit, softmax 0.9", "softmax", {}, {}),
        ("FREE shallow-deep", "shallow_deep", {"shallow_layer": 1}, {}),
        (demo.LOSSLESS_ROW, "self_speculation", {"shallow_layer": 1, "threshold": 0.0}, {}),
    ])


def test_short_demo_run_trains_evaluates_and_reuses_its_cache(tmp_path, monkeypatch, capsys):
    tiny_rows(monkeypatch)
    tiny = TINY + ["--train_examples", "40", "--eval_examples", "3",
                   "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out")]
    first = demo.main(tiny)
    assert first["model_cached"] is False and first["main_metric"] == "rougeL"
    results = first["results"]
    assert list(results) == ["full model", "static exit, layer 1", "early exit, softmax 0.9", "FREE shallow-deep",
                             demo.LOSSLESS_ROW]
    assert results["full model"]["eval_block_avg"] == 2.0 and results["full model"]["eval_samples"] == 3
    assert results["static exit, layer 1"]["eval_block_avg"] == 1.0
    assert results["early exit, softmax 0.9"]["eval_block_avg"] <= 2.0
    for row in results.values():
        assert "eval_rougeL" in row and len(row["tokens_per_second_rounds"]) == 2 and row["tokens_per_second"] > 0
    assert results["full model"]["speedup"] == 1.0
    assert set(first["targets"]) == {"full_model_quality", "blocks_saved", "quality_drop", "speedup",
                                     "lossless_identical", "lossless_speedup"}
    assert first["targets"]["lossless_identical"]["met"]  # drafts at threshold 0, verified: the full model's tokens
    assert results[demo.LOSSLESS_ROW]["eval_block_avg_free"] < results[demo.LOSSLESS_ROW]["eval_block_avg"]
    saved = json.loads((tmp_path / "out" / "demo_results.json").read_text())
    assert saved["results"].keys() == results.keys() and saved["main_metric"] == "rougeL"
    assert saved["static_exit_rougeL"] == {"1": results["static exit, layer 1"]["eval_rougeL"],
                                           "2": results["full model"]["eval_rougeL"]}
    table = (tmp_path / "out" / "demo_results.md").read_text()
    assert table.startswith("| method | ROUGE-L | ROUGE-2 | block_avg | block_avg (FREE's count)")
    assert "early exit, softmax 0.9" in table
    # the per-token view: the target row's tokens at batch 1, each with its exit layer, as the task
    # script's own (batched) evaluation recorded them
    view = first["exit_view"]
    assert len(view) == 2
    with open(tmp_path / "out" / "runs" / "early_exit__softmax_0_9" / "eval_predictions.jsonl") as handle:
        batched = [json.loads(line)["exit_layers"] for line in handle]
    assert [example["exit_layers"] for example in view] == batched[:2]
    assert all(len(e["pieces"]) == len(e["exit_layers"]) > 0 for e in view)
    page = (tmp_path / "out" / "exit_view.html").read_text()
    assert page.count("<sub>") == sum(len(e["pieces"]) for e in view) + 2  # + the legend's layers
    assert "Exit layer of each token" in capsys.readouterr().out

    second = demo.main(tiny)
    assert second["model_cached"] is True and second["train_minutes"] == first["train_minutes"]
    assert second["results"]["full model"]["eval_rougeL"] == results["full model"]["eval_rougeL"]
    assert "Reusing the cached model" in capsys.readouterr().out


def test_qa_demo_runs_through_the_same_path(tmp_path, monkeypatch):
    tiny_rows(monkeypatch)
    summary = demo.main(["--task", "qa"] + TINY + ["--train_contexts", "40", "--eval_contexts", "2",
                                                   "--cache_dir", str(tmp_path / "cache"),
                                                   "--output_dir", str(tmp_path / "out")])
    assert summary["main_metric"] == "f1" and summary["results"]["full model"]["eval_samples"] == 6
    assert "eval_f1" in summary["results"]["early exit, softmax 0.9"]


@pytest.mark.parametrize("argv, message", [
    (["--task", "mt"], "--task mt is not a demo task"),
    (["--timing_rounds", "0"], "--timing_rounds=0 must be a positive integer"),
])
def test_bad_demo_arguments_name_the_flag(argv, message):
    with pytest.raises(ValueError, match=message):
        demo.parse_args(argv)


def test_each_task_has_its_own_cache_and_outputs():
    bio, qa = demo.parse_args([]), demo.parse_args(["--task", "qa"])
    assert bio.task == "bio" and bio.cache_dir.endswith("cache/demo_bio") and bio.output_dir.endswith("outputs/demo")
    assert qa.cache_dir.endswith("cache/demo_model")  # where bench/ and `TASK=qa scripts/run_sweep.sh` find it
    assert qa.output_dir.endswith("outputs/demo_qa") and qa.train_contexts == demo.QASettings().train_contexts


def test_thread_choice_reads_core_use_now_and_says_why(monkeypatch):
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(demo, "cores_in_use", lambda seconds=0.3: 0.2)
    assert demo.default_threads() == (2, "0.2 of 2 cores busy with other work over 0.3 s")
    monkeypatch.setattr(demo, "cores_in_use", lambda seconds=0.3: 1.4)
    assert demo.default_threads()[0] == 1
    monkeypatch.setattr(demo, "cores_in_use", lambda seconds=0.3: None)
    assert demo.default_threads() == (2, "core use not readable here (no /proc/stat): the default")


def test_core_use_is_a_share_of_the_cores():
    import os

    used = demo.cores_in_use(0.05)
    assert used is None or 0.0 <= used <= (os.cpu_count() or 1) + 1e-9


LLAMA_TINY = ["--arch", "llama", "--vocab_size", "300", "--hidden_size", "32", "--num_heads", "2", "--num_kv_heads", "1",
              "--intermediate_size", "64", "--decoder_layers", "2", "--train_steps", "2", "--batch_size", "4",
              "--threads", "1", "--eval_batch_size", "2", "--timing_samples", "2", "--timing_rounds", "2",
              "--train_examples", "40", "--eval_examples", "3"]


@pytest.mark.parametrize("recipe", ["weighted_ce", "layerskip"])
def test_llama_demo_runs_through_the_same_path(recipe, tmp_path, monkeypatch):
    """--arch llama: a decoder-only model trained by the task script on prompts, the same table;
    the per-token view holds the new tokens after the prompt, as the batched evaluation decoded them."""
    tiny_rows(monkeypatch)
    summary = demo.main(LLAMA_TINY + ["--recipe", recipe, "--cache_dir", str(tmp_path / "cache"),
                                      "--output_dir", str(tmp_path / "out")])
    assert summary["arch"] == "llama" and summary["settings"]["recipe"] == recipe
    results = summary["results"]
    assert list(results) == ["full model", "static exit, layer 1", "early exit, softmax 0.9", "FREE shallow-deep",
                             demo.LOSSLESS_ROW]
    assert results["full model"]["eval_block_avg"] == 2.0 and results["static exit, layer 1"]["eval_block_avg"] == 1.0
    assert results["full model"]["eval_truncated_sources"] == 0
    assert summary["targets"]["lossless_identical"]["met"]
    with open(tmp_path / "out" / "runs" / "early_exit__softmax_0_9_llama" / "eval_predictions.jsonl") as handle:
        batched = [json.loads(line)["exit_layers"] for line in handle]
    assert [example["exit_layers"] for example in summary["exit_view"]] == batched[:2]
    assert (tmp_path / "out" / "demo_results.json").is_file()


def test_llama_demo_has_its_own_cache_and_outputs():
    llama = demo.parse_args(["--arch", "llama"])
    assert llama.cache_dir.endswith("cache/demo_bio_llama") and llama.output_dir.endswith("outputs/demo_llama")
    assert llama.recipe == "weighted_ce" and llama.decoder_layers == 8
    with pytest.raises(ValueError, match="--task qa is not a demo task of --arch llama"):
        demo.parse_args(["--arch", "llama", "--task", "qa"])
    with pytest.raises(ValueError, match="--arch gpt is not a demo model"):
        demo.parse_args(["--arch", "gpt"])
