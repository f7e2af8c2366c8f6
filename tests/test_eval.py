"""vlmtrain eval: per-budget quality and cost, checked against the same figures computed here sample by sample
(full-sequence logits, a hand-written greedy decoder); JSON and plot; several models in one comparison."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import small_recipe
from PIL import Image

from vlmtrain.data.samples import RawSample
from vlmtrain.data.sources import read_shard
from vlmtrain.errors import UserError
from vlmtrain.evaluate import evaluate
from vlmtrain.evaluate.metrics import word_recall
from vlmtrain.export.write import export
from vlmtrain.inference import open_run
from vlmtrain.modeling.tokenizers import IGNORE_INDEX
from vlmtrain.train.run import fit

FIELDS = {
    "budget",
    "samples",
    "images",
    "loss",
    "token_accuracy",
    "exact_match",
    "word_recall",
    "visual_tokens_per_image",
    "visual_tokens_per_sample",
    "images_per_s",
    "latency_ms",
    "latency_p10_ms",
    "latency_p90_ms",
    "chosen",
}


@pytest.fixture(scope="module")
def trained_run(demo_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("evalrun") / "run"
    fit(
        small_recipe(
            demo_dir,
            run_dir,
            "logger=none",
            "data.val=null",
            "trainer.max_steps=3",
            "optim.lm.lr=0.01",
            "optim.projector.lr=0.01",
        )
    )
    return run_dir


@torch.no_grad()
def figures_by_hand(run_dir, urls: list[str], budget: int, limit: int, max_new_tokens: int) -> dict:
    """Loss, token accuracy, exact match, word recall and visual tokens of the first ``limit`` samples, one
    sample at a time: cross-entropy of full-sequence logits over the target tokens, and greedy decoding by
    repeated full forward passes (no KV cache, no ``generate``)."""
    from vlmtrain.data.builder import BatchBuilder
    from vlmtrain.data.config import DecodingConfig

    model = open_run(run_dir)
    builder = BatchBuilder(model.geometry, model.text, model.text_format.text_config(max_length=10**6), DecodingConfig())
    samples = [s for url in urls for s in read_shard(url) if isinstance(s, RawSample)][:limit]
    loss_sum = correct = tokens = visual = images = 0
    exact, recall, examples = [], [], []
    eos = model.tokenizer.eos_token_id
    for sample in samples:
        inputs = builder.collate([builder.encode(sample, budget)], budget).inputs
        logits = model.model(inputs)[0, :-1]
        labels = inputs.labels[0, 1:]
        counted = labels != IGNORE_INDEX
        loss_sum += float(F.cross_entropy(logits[counted], labels[counted], reduction="sum"))
        correct += int((logits[counted].argmax(-1) == labels[counted]).sum())
        tokens += int(counted.sum())
        visual += sum(model.geometry.image(h, w, budget).tokens for h, w in sample.sizes)
        images += len(sample.sizes)
        start = int(torch.nonzero(inputs.labels[0] != IGNORE_INDEX)[0, 0])
        sequence = inputs.input_ids[:, :start]
        embeds = model.model.embed(sequence, inputs.images)[0]
        generated: list[int] = []
        for _ in range(max_new_tokens):
            token = int(model.model.lm(inputs_embeds=embeds, use_cache=False).logits[0, -1].argmax())
            if token == eos:
                break
            generated.append(token)
            embeds = torch.cat([embeds, model.model.lm.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
        target = model.tokenizer.decode(inputs.input_ids[0, start:-1], skip_special_tokens=True)
        text = model.tokenizer.decode(generated, skip_special_tokens=True)
        exact.append(text.strip() == target.strip())
        recall.append(word_recall(target, text))
        examples.append({"key": sample.key, "target": target, "generated": text})
    return {
        "examples": examples,
        "samples": len(samples),
        "images": images,
        "loss": loss_sum / tokens,
        "token_accuracy": correct / tokens,
        "exact_match": sum(exact) / len(exact),
        "word_recall": sum(recall) / len(recall),
        "visual_tokens_per_image": visual / images,
        "visual_tokens_per_sample": visual / len(samples),
    }


@pytest.mark.slow
def test_eval_figures_equal_a_sample_by_sample_computation_for_a_run_and_its_export(trained_run, demo_dir, tmp_path):
    exported = export(trained_run, tmp_path / "export")
    data = f"{demo_dir}/val-000000.tar"
    results = evaluate(
        [trained_run, exported],
        data,
        budgets=[70, 140],
        limit=5,
        out=tmp_path / "eval",
        names=["run", "export"],
        max_new_tokens=4,
    )
    assert [m["name"] for m in results["models"]] == ["run", "export"]
    expected = {budget: figures_by_hand(trained_run, [data], budget, limit=5, max_new_tokens=4) for budget in (70, 140)}
    assert 0 < expected[70]["token_accuracy"] < 1 or 0 < expected[140]["token_accuracy"] < 1  # a case that can go wrong
    for model in results["models"]:
        assert [row["budget"] for row in model["budgets"]] == [70, 140]
        for row in model["budgets"]:
            assert set(row) == FIELDS
            hand = expected[row["budget"]]
            assert (row["samples"], row["images"]) == (hand["samples"], hand["images"]) == (5, 5)
            assert row["loss"] == pytest.approx(hand["loss"], rel=1e-5)
            for name in ("token_accuracy", "exact_match", "word_recall", "visual_tokens_per_image", "visual_tokens_per_sample"):
                assert row[name] == pytest.approx(hand[name]), name
            assert 0 < row["latency_p10_ms"] <= row["latency_ms"] <= row["latency_p90_ms"] and row["images_per_s"] > 0
            assert model["examples"][str(row["budget"])] == hand["examples"]
    assert json.loads((tmp_path / "eval" / "eval.json").read_text()) == results
    with Image.open(tmp_path / "eval" / "eval.png") as plot:
        assert plot.format == "PNG" and plot.width > 800


@pytest.mark.slow
def test_the_model_card_carries_the_evaluation_wherever_eval_wrote_it(trained_run, demo_dir, tmp_path):
    data = f"{demo_dir}/val-000000.tar"
    evaluate([trained_run], data, budgets=[70], limit=3, out=tmp_path / "elsewhere", generate=False)
    card = (export(trained_run, tmp_path / "export") / "README.md").read_text()
    assert f"Evaluated on `{data}`, 3 samples per budget." in card and "| 70 |" in card
    assert "exact match" in card.splitlines()[card.splitlines().index("## Results by budget") + 4]


@pytest.mark.slow
def test_eval_takes_the_prompt_and_target_field_to_use(trained_run, demo_dir, tmp_path):
    data = f"{demo_dir}/val-000000.tar"
    photos = [s.record["photo"] for s in read_shard(data) if isinstance(s, RawSample)][:3]
    text = {"prompt": "<image> shows a ", "target_field": "photo"}
    results = evaluate([trained_run], data, budgets=[70], limit=3, out=tmp_path / "eval", max_new_tokens=2, text=text)
    assert [example["target"] for example in results["models"][0]["examples"]["70"]] == photos
    assert results["text"] == text
    with pytest.raises(UserError, match="no usable sample"):
        evaluate([trained_run], data, budgets=[70], limit=3, out=tmp_path / "eval", text={"target_field": "caption"})


def test_word_recall():
    assert word_recall("a red Cat", "the cat is red") == pytest.approx(2 / 3)
    assert word_recall("", "anything") == 1.0
    assert word_recall("moon", "mo on") == 0.0


@pytest.mark.slow
def test_results_reach_wandb_offline(trained_run, demo_dir, tmp_path):
    from vlmtrain.evaluate.plot import log_to_wandb

    results = evaluate([trained_run], f"{demo_dir}/val-000000.tar", budgets=[70], limit=2, out=tmp_path, generate=False)
    log_to_wandb(results, tmp_path, project="vlmtrain-test", offline=True)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = {p.name for p in runs[0].rglob("*")}
    assert any(name.endswith(".wandb") for name in files) and any(name.endswith(".png") for name in files)
