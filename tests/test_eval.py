"""vlmtrain eval: per-budget quality and cost, JSON and plot, several models in one comparison."""

from __future__ import annotations

import json

import pytest
from conftest import small_recipe
from PIL import Image

from vlmtrain.evaluate import evaluate, word_recall
from vlmtrain.export import export
from vlmtrain.train.run import fit

FIELDS = {"budget", "samples", "images", "loss", "token_accuracy", "exact_match", "word_recall", "visual_tokens_per_image", "images_per_s", "latency_ms"}


@pytest.fixture(scope="module")
def trained_run(demo_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("evalrun") / "run"
    fit(small_recipe(demo_dir, run_dir, "logger=none", "data.val=null", "trainer.max_steps=3"))
    return run_dir


def test_a_run_and_its_export_evaluate_alike_and_write_json_and_plot(trained_run, demo_dir, tmp_path):
    exported = export(trained_run, tmp_path / "export")
    data = f"{demo_dir}/val-000000.tar"
    results = evaluate([trained_run, exported], data, budgets=[70, 140], limit=5, out=tmp_path / "eval", names=["run", "export"], max_new_tokens=4)
    assert [m["name"] for m in results["models"]] == ["run", "export"]
    for model in results["models"]:
        assert [row["budget"] for row in model["budgets"]] == [70, 140]
        for row in model["budgets"]:
            assert set(row) == FIELDS
            assert row["samples"] == row["images"] == 5
            assert 0 <= row["token_accuracy"] <= 1 and 0 <= row["exact_match"] <= 1 and 0 <= row["word_recall"] <= 1
            assert 0 < row["visual_tokens_per_image"] <= row["budget"] and row["latency_ms"] > 0 and row["images_per_s"] > 0
    run, exp = (m["budgets"] for m in results["models"])
    for a, b in zip(run, exp):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert (a["token_accuracy"], a["exact_match"], a["visual_tokens_per_image"]) == (b["token_accuracy"], b["exact_match"], b["visual_tokens_per_image"])
    assert json.loads((tmp_path / "eval" / "eval.json").read_text()) == results
    with Image.open(tmp_path / "eval" / "eval.png") as plot:
        assert plot.format == "PNG" and plot.width > 800


def test_the_model_card_carries_the_evaluation(trained_run, demo_dir, tmp_path):
    evaluate([trained_run], f"{demo_dir}/val-000000.tar", budgets=[70], limit=3, out=tmp_path / "eval", generate=False)
    card = (export(trained_run, tmp_path / "export", evaluation=tmp_path / "eval" / "eval.json") / "README.md").read_text()
    assert "## Results by budget" in card and "| 70 |" in card
    assert "exact match" in card.splitlines()[card.splitlines().index("## Results by budget") + 4]


def test_word_recall():
    assert word_recall("a red Cat", "the cat is red") == pytest.approx(2 / 3)
    assert word_recall("", "anything") == 1.0
    assert word_recall("moon", "mo on") == 0.0


def test_results_reach_wandb_offline(trained_run, demo_dir, tmp_path):
    from vlmtrain.evaluate import log_to_wandb

    results = evaluate([trained_run], f"{demo_dir}/val-000000.tar", budgets=[70], limit=2, out=tmp_path, generate=False)
    log_to_wandb(results, tmp_path, project="vlmtrain-test", offline=True)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = {p.name for p in runs[0].rglob("*")}
    assert any(name.endswith(".wandb") for name in files) and any(name.endswith(".png") for name in files)
