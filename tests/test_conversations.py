"""Conversations end to end: LLaVA shards train with a budget per image, the export answers a conversation
with one budget per image and gives the trained model's logits, and eval scores every assistant turn."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from helpers import ROOT
from PIL import Image

from vlmtrain.config import load_recipe
from vlmtrain.evaluate import evaluate
from vlmtrain.export.write import export
from vlmtrain.inference import load, open_run
from vlmtrain.train.run import fit

CHAT = ROOT / "recipes" / "chat-tiny.yaml"


def chat_overrides(chat_dir, run_dir, *overrides: str) -> list[str]:
    """The chat recipe shrunk to seconds of CPU: a 1-layer ViT and LM of width 32, the test's chat shards."""
    return [
        f"run_dir={run_dir}",
        "logger=csv",
        "model.vision.path=null",
        "model.vision.width=32",
        "model.vision.depth=1",
        "model.vision.heads=2",
        "model.lm.hf_config.hidden_size=32",
        "model.lm.hf_config.intermediate_size=64",
        "model.lm.hf_config.num_hidden_layers=1",
        "model.lm.hf_config.num_attention_heads=2",
        "model.lm.hf_config.num_key_value_heads=2",
        "budget.levels=[70,1120]",
        f"data.train={chat_dir}/train-{{000000..000003}}.tar",
        f"data.val={chat_dir}/val-000000.tar",
        "data.val_samples=4",
        "data.num_workers=0",
        "trainer.max_steps=4",
        "trainer.val_every=4",
        "trainer.log_every=1",
        "trainer.checkpoint_every=4",
        *overrides,
    ]


class StepLog(L.Callback):
    def __init__(self) -> None:
        self.image_budgets: list[list[list[int]]] = []  # per step, per sample: its images' budgets

    def on_train_batch_end(self, trainer, module, outputs, step, batch_idx) -> None:
        (batch,) = step.batches
        rows = batch.inputs.images.sample_index.tolist()
        self.image_budgets.append(
            [[b for b, r in zip(batch.image_budgets, rows, strict=True) if r == row] for row in range(batch.size)]
        )


@pytest.fixture(scope="module")
def chat_run(chat_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("chatrun") / "run"
    log = StepLog()
    fit(load_recipe(CHAT, chat_overrides(chat_dir, run_dir)), callbacks=[log])
    return run_dir, log


@pytest.mark.slow
def test_llava_shards_train_with_two_budgets_inside_one_sample(chat_run):
    run_dir, log = chat_run
    budgets = [budget for step in log.image_budgets for sample in step for budget in sample]
    assert set(budgets) <= {70, 1120} and len(log.image_budgets) == 4
    assert any(len(set(sample)) == 2 for step in log.image_budgets for sample in step)  # 1120 and 70 in one pass
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["budgets"]) == {str(b) for b in budgets}


@pytest.mark.slow
def test_the_export_answers_a_conversation_with_a_budget_per_image_as_training_computed_it(chat_run, chat_dir, tmp_path):
    run_dir, _ = chat_run
    record = next(r for r in json.loads((chat_dir / "val.json").read_text()) if len(r.get("image", [])) == 2)
    images = [Image.open(chat_dir / "images" / name) for name in record["image"]]
    messages = [{"role": "user", "content": record["conversations"][0]["value"]}]
    trained = open_run(run_dir)
    exported = load(export(run_dir, tmp_path / "export"))
    for budgets in ([1120, 70], [70, 1120]):
        torch.testing.assert_close(
            exported.logits(images, messages=messages, budget=budgets),
            trained.logits(images, messages=messages, budget=budgets),
            atol=1e-5,
            rtol=1e-5,
        )
        assert isinstance(exported.generate(images, messages=messages, budget=budgets, max_new_tokens=4), str)
    prompt = exported.inputs(images, messages=messages, budget=[1120, 70])[0][0].tolist()
    assert exported.tokenizer.decode(prompt).endswith("What is the small word on the first image?\nassistant: ")
    assert prompt.count(exported.text.image_token_id) == sum(
        exported.geometry.image(i.height, i.width, b).tokens for i, b in zip(images, [1120, 70], strict=True)
    )


@pytest.mark.slow
def test_eval_scores_every_assistant_turn_of_a_conversation_set(chat_run, chat_dir, tmp_path):
    run_dir, _ = chat_run
    results = evaluate([run_dir], f"{chat_dir}/val-000000.tar", budgets=[70], limit=4, out=tmp_path, max_new_tokens=4)
    records = json.loads((chat_dir / "val.json").read_text())[:4]
    turns = [turn["value"] for r in records for turn in r["conversations"] if turn["from"] == "gpt"]
    examples = results["models"][0]["examples"]["70"]
    assert [example["target"] for example in examples] == turns[: len(examples)] and len(examples) == min(8, len(turns))
    assert [example["key"] for example in examples] == [
        r["id"] for r in records for turn in r["conversations"] if turn["from"] == "gpt"
    ][:8]
