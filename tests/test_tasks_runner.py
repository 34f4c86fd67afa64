"""Pieces of the shared pipeline: aggregation of exit statistics and the results files."""

import json

import pytest

from tasks.runner import ExitStatsTotals, check_output_dir, model_class, prepare_output_dir, save_results


def _stats(layers, **extra):
    """exit_stats of one generate call whose tokens exited at `layers` (2-layer decoder); layer 2
    also ran once per two tokens to recompute skipped ones (as FREE's deep pass), so block_avg
    counts more than the mean exit layer (block_avg_free)."""
    block_op = [len(layers), layers.count(2) + len(layers) // 2]
    return {"tokens": len(layers), "block_avg": sum(block_op) / len(layers), "block_avg_free": sum(layers) / len(layers),
            "block_op": block_op, "exit_layer_counts": [layers.count(1), layers.count(2)], "exit_layers": [layers],
            "time_total": 0.5, "time_blocks": 0.25, **extra}


def test_exit_stats_are_token_weighted_and_summed():
    totals = ExitStatsTotals()
    totals.add(_stats([1, 1, 1, 2]))  # 4 tokens, 7 block runs
    totals.add(_stats([2, 2]))  # 2 tokens, 5 block runs
    out = totals.metrics()
    assert out["block_avg"] == 12 / 6  # not the mean of means ((7 / 4 + 5 / 2) / 2)
    assert out["block_avg_free"] == 9 / 6
    assert out["block_op"] == [6, 6]
    assert out["exit_layer_counts"] == [3, 3]
    assert out["tokens"] == 6
    assert out["time_total"] == pytest.approx(1.0) and out["time_blocks"] == pytest.approx(0.5)
    assert not any(k.startswith("flops") for k in out)


def test_per_sample_records_come_out_in_dataset_order_whatever_the_calls_order():
    # batches formed by length: the call with samples 2 and 0 comes before the one with sample 1
    first = _stats([1, 2], layer_traces=[{"ranks": ["s2"]}, {"ranks": ["s0"]}], jsd_steps=[["s2 a"], ["s0 a", "s0 b"]])
    first["exit_layers"] = [[1], [2]]
    second = _stats([1], layer_traces=[{"ranks": ["s1"]}], jsd_steps=[["s1 a"]])
    totals = ExitStatsTotals()
    totals.add(first, [2, 0])
    totals.add(second, [1])
    assert [trace["ranks"][0] for trace in totals.layer_traces] == ["s0", "s1", "s2"]
    assert totals.jsd_steps == ["s0 a", "s0 b", "s1 a", "s2 a"]
    assert totals.samples == 3 and totals.metrics()["block_avg_free"] == 4 / 3


def test_any_numeric_flops_figure_is_summed_and_averaged_per_sample():
    totals = ExitStatsTotals()
    totals.add(_stats([1], flops_confidence=100, flops_blocks=1000.0, flops_total=1100, flops_layers=[1, 2]))
    totals.add(_stats([2], flops_confidence=300, flops_blocks=3000.0, flops_total=3300, flops_layers=[3, 4]))
    out = totals.metrics()
    assert out["flops_confidence"] == 400 and out["flops_confidence_per_sample"] == 200
    assert out["flops_blocks"] == 4000 and out["flops_total"] == 4400 and out["flops_total_per_sample"] == 2200
    assert "flops_layers" not in out  # only numbers are summed


def test_every_counter_a_step_declares_is_summed_over_calls():
    from models.results import METHOD_COUNTS, RowResult, merge_rows
    from models.self_speculation import SelfSpeculativeStep
    from models.shallow_deep import ShallowDeepStep

    totals = ExitStatsTotals()
    for step in (ShallowDeepStep, SelfSpeculativeStep):
        assert step.counted in METHOD_COUNTS.values()
        for _ in range(2):
            row = RowResult(tokens=[0, 5], exit_layers=[2], block_runs=[1, 1])
            row.counts.update({name: 3 for name in step.counted})
            totals.add(merge_rows([row], 2, counted=step.counted))
    out = totals.metrics()
    for names in METHOD_COUNTS.values():
        for name in names:
            assert out[name] == 6, name


def test_a_counter_no_step_declares_is_an_error_not_dropped():
    from models.results import RowResult, merge_rows

    row = RowResult(tokens=[0, 5], exit_layers=[2], block_runs=[1, 1])
    row.counts["new_counter"] += 1
    with pytest.raises(ValueError, match="new_counter"):
        merge_rows([row], 2, counted=("rollbacks",))


def test_results_files_merge_and_prefix(tmp_path):
    out = str(tmp_path)
    save_results(out, "train", {"train_loss": 1.5, "epoch": 2.0})
    saved = save_results(out, "eval", {"rouge1": 40.0, "block_op": [3, 1]},
                         [{"index": 0, "id": "a", "prediction": "x", "references": ["y"]}])
    assert saved == {"eval_rouge1": 40.0, "eval_block_op": [3, 1]}
    assert json.loads((tmp_path / "eval_results.json").read_text()) == saved
    assert json.loads((tmp_path / "all_results.json").read_text()) == {
        "train_loss": 1.5, "train_epoch": 2.0, "eval_rouge1": 40.0, "eval_block_op": [3, 1]}
    lines = (tmp_path / "eval_predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["prediction"] for line in lines] == ["x"]


def test_overwrite_removes_only_run_files(tmp_path):
    (tmp_path / "all_results.json").write_text("{}")
    (tmp_path / "config.json").write_text("{}")  # a model stored here stays
    with pytest.raises(ValueError, match="not empty"):
        check_output_dir(str(tmp_path), overwrite=False)
    check_output_dir(str(tmp_path), overwrite=True)
    prepare_output_dir(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_model_class_choice():
    from models.deploying_t5 import DeployT5ForConditionalGeneration
    from models.modeling_t5 import TrainT5ForConditionalGeneration
    from transformers import T5ForConditionalGeneration
    assert model_class(training=True, deploy=True) is TrainT5ForConditionalGeneration
    assert model_class(training=False, deploy=False) is T5ForConditionalGeneration
    assert model_class(training=False, deploy=True) is DeployT5ForConditionalGeneration


# ----- the generated length: ours (max_new_tokens) or FREE's (HF's max_length) -------------------
@pytest.mark.parametrize("extra, new_tokens", [
    ([], 4),                                                     # ours: --max_answer_length 4 generates 4
    (["--length_counts_start_token", "True"], 3),                # FREE's QA: max_length 4 generates 3
    (["--generation_max_length", "6"], 6),
    (["--generation_max_length", "6", "--length_counts_start_token", "True"], 5),
])
def test_generated_length_convention(tmp_path, monkeypatch, extra, new_tokens):
    from tasks import runner
    from tasks.adapters import QuestionAnswering
    from util.toy_models import build_toy_t5, train_toy_tokenizer

    context = "Mira keeps three blue boats near the harbour."
    data = tmp_path / "dev.jsonl"
    data.write_text(json.dumps({"id": "0", "question": "How many boats?", "context": context,
                                "answers": {"text": ["three"], "answer_start": [context.index("three")]}}) + "\n")
    model = str(tmp_path / "model")
    build_toy_t5(train_toy_tokenizer([f"question: How many boats? context: {context}"], vocab_size=80), save_dir=model)
    asked = []
    real = runner.generate_predictions
    monkeypatch.setattr(runner, "generate_predictions",
                        lambda *a, **k: asked.append(k["max_new_tokens"]) or real(*a, **k))
    results = runner.run(QuestionAnswering(), ["--model_name_or_path", model, "--validation_file", str(data),
                                               "--do_eval", "--output_dir", str(tmp_path / "out"),
                                               "--max_answer_length", "4", "--disable_tqdm", "True", *extra])
    assert asked == [new_tokens]
    assert results["eval_gen_len"] <= new_tokens


def test_a_length_counting_the_start_token_must_leave_a_token(tmp_path):
    from tasks import runner
    from tasks.adapters import QuestionAnswering

    data = tmp_path / "dev.jsonl"
    data.write_text("{}\n")
    with pytest.raises(ValueError, match="--length_counts_start_token"):
        runner.run(QuestionAnswering(), ["--model_name_or_path", "unused", "--validation_file", str(data), "--do_eval",
                                         "--output_dir", str(tmp_path / "out"), "--max_answer_length", "1",
                                         "--length_counts_start_token", "True"])
    assert not (tmp_path / "out").exists()


def test_batches_by_length_give_every_result_in_dataset_order_as_one_at_a_time(tmp_path):
    from models.deploying_t5 import DeployT5ForConditionalGeneration
    from tasks.runner import generate_predictions
    from util.additional_args import AdditionalArguments
    from util.toy_models import build_toy_t5, train_toy_tokenizer

    words = "mira keeps three blue boats near the old harbour and sells fish every morning".split()
    sources = [" ".join(words[: 2 + (5 * i) % 13]) for i in range(7)]  # lengths out of order
    tokenizer = train_toy_tokenizer(sources, vocab_size=80)
    build_toy_t5(tokenizer, num_decoder_layers=3, save_dir=str(tmp_path / "toy"))
    model = DeployT5ForConditionalGeneration.from_pretrained(str(tmp_path / "toy")).eval()
    flags = AdditionalArguments(deploy_scenario=True, use_early_exit=True, exit_conf_type="softmax",
                                exit_conf_threshold=0.2, count_flops=True)
    calls, real = [], model.generate
    model.generate = lambda **k: calls.append(k["attention_mask"].sum(-1).tolist()) or real(**k)

    results = {}
    for batch_size, by_length in ((1, False), (3, True)):
        calls.clear()
        stats = ExitStatsTotals()
        out = generate_predictions(model, tokenizer, sources, 32, 6, 1, batch_size, stats=stats, show_progress=False,
                                   exit_args=flags, by_length=by_length)
        results[batch_size] = (out, {k: v for k, v in stats.metrics().items() if not k.startswith("time_")})
    lengths = [n for call in calls for n in call]
    assert lengths == sorted(lengths, reverse=True) and len(calls) == 3  # longest first, in batches of 3
    assert lengths != [len(tokenizer(s)["input_ids"]) for s in sources]  # the order did change
    assert results[3] == results[1]  # texts, lengths, exit layers per sample, block and FLOP figures
    assert len(set(map(tuple, results[1][0][2]))) > 1  # samples exited differently: the order shows
