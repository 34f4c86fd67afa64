"""util/real_llm_qa.py (src/real_llm.py's QA tables) on fake SQuAD articles and a tiny random Gemma 3."""

import pytest
import torch
from transformers import Gemma3TextConfig

from models.deploying_causal import DeployGemma3ForCausalLM
from util import real_llm_qa as qa
from util.toy_models import train_toy_tokenizer


def article(title, sentences, question_at):
    context = " ".join(sentences)
    answer = sentences[question_at].split()[0]
    start = context.index(sentences[question_at])
    return {"title": title, "paragraphs": [{"context": context, "qas": [
        {"question": f"What about {title}?", "answers": [{"text": answer, "answer_start": start}]}]}]}


def test_answer_sentence_finds_the_sentence_of_the_answer():
    context = "Mills grind grain. Rivers turn the wheels! Millers count sacks? Yes."
    assert qa.answer_sentence(context, context.index("turn")) == "Rivers turn the wheels!"
    assert qa.answer_sentence(context, 0) == "Mills grind grain."
    assert qa.answer_sentence(context, context.index("Yes")) == "Yes."


def test_examples_round_robin_and_the_split_keeps_evaluation_articles_apart():
    articles = [article(f"a{i}", [f"Word{i} one.", f"Name{i} two."], i % 2) for i in range(6)]
    evaluation, apart = qa.split_articles(articles)
    assert {a["title"] for a in evaluation}.isdisjoint(a["title"] for a in apart)
    got = qa.examples(evaluation, 10)
    assert [e.question for e in got] == ["What about a0?", "What about a1?", "What about a2?"]
    assert got[1].context == "Name1 two." and got[1].answers == ["Name1"]
    prompt = qa.few_shot_prompt(got[:1], got[1])
    assert prompt == ("Context: Word0 one.\nQuestion: What about a0?\nAnswer: Word0\n\n"
                      "Context: Name1 two.\nQuestion: What about a1?\nAnswer:")


@pytest.fixture(scope="module")
def tiny():
    words = "the mill turns and the miller counts sacks of grain by the river Context Question Answer".split()
    tokenizer = train_toy_tokenizer([" ".join(words)] * 3, vocab_size=90)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = DeployGemma3ForCausalLM(config).eval()
    with torch.no_grad():  # random norms at zero would make every layer's read-out alike
        for param in model.parameters():
            if param.dim() == 1:
                param.normal_(0, 0.5)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def test_qa_table_on_a_tiny_model(tiny):
    model, tokenizer = tiny
    questions = [qa.QAExample("the mill turns", "the miller counts", ["sacks of grain"]),
                 qa.QAExample("by the river", "the mill", ["grain"])]
    shots = [qa.QAExample("the river", "the mill turns", ["the miller"])]
    rows = qa.settings(5, shallow_layers=[2], static_layers=[2], min_layer=2, threshold=0.5, draft_vocab=8)
    result = qa.qa_table(model, tokenizer, questions, shots, rows, max_new_tokens=4, desc="test")
    table = result["rows"]
    assert list(table) == list(rows) + ["HF generate"]
    # identical to the full model by construction: HF's generate, every-layer checks that never
    # exit (threshold 1), and self-speculation
    for name in ("HF generate", "check-all full head", "check-all decaying", "self-spec 2", "self-spec 2 draft 8"):
        assert table[name]["same_output_as_full"] == 1.0, name
        assert table[name]["answers"] == table["full"]["answers"], name
    assert table["static 2"]["block_avg"] == 2.0 and table["full"]["block_avg"] == 5.0
    assert table["full"]["speed_vs_full_cpu"] == pytest.approx(1.0)
    assert 0.0 <= table["self-spec 2"]["acceptance_rate"] <= 1.0
    assert all(0.0 <= r["f1"] <= 100.0 for r in table.values())
    markdown = qa.table_markdown(result)
    assert "| full |" in markdown and "| HF generate |" in markdown


def test_the_adaptation_key_follows_the_model_not_the_checkout(tmp_path):
    settings = qa.AdaptSettings(steps=3, lr=1e-3, lora_rank=2, rotation=2)
    train = [qa.QAExample("the mill", "what turns", ["the mill"])]
    one, two = tmp_path / "a" / "gemma-abc123", tmp_path / "b" / "gemma-abc123"
    assert settings.key(one, train) == settings.key(two, train)
    assert settings.key(one, train) != settings.key(tmp_path / "a" / "gemma-def456", train)
    assert settings.key(one, train) != settings.key(one, train + train)
