"""The automatic budget: labels are the model's own losses at each level; a selector trained on labels where
small text needs the high level and large text does not picks exactly that on held-back images; the export
carries it and ``budget="auto"`` uses it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, built, in_use, small_recipe
from safetensors.torch import load_file, save_file

from vlmtrain.cli import main
from vlmtrain.config import load_recipe
from vlmtrain.data.builder import BatchBuilder
from vlmtrain.data.config import DecodingConfig
from vlmtrain.data.demo import make_demo_shards
from vlmtrain.data.images import decode_image
from vlmtrain.data.samples import RawSample
from vlmtrain.data.sources import read_shard
from vlmtrain.errors import UserError
from vlmtrain.evaluate import evaluate
from vlmtrain.export.write import write_export
from vlmtrain.inference import ExportedModel, load
from vlmtrain.modeling.tokenizers import IGNORE_INDEX
from vlmtrain.selector.labels import label_budgets
from vlmtrain.selector.model import BudgetSelector


def exported(recipe) -> ExportedModel:
    module = built(recipe)
    return in_use(module)


@torch.no_grad()
def test_budget_labels_are_the_models_loss_at_each_level_and_the_selectors_features(demo_dir, tmp_path):
    model = exported(small_recipe(demo_dir, tmp_path / "run"))
    shard = f"{demo_dir}/val-000000.tar"
    labels = label_budgets(model, [shard], limit=4)
    samples = [s for s in read_shard(shard) if isinstance(s, RawSample)][:4]
    assert labels.keys == [s.key for s in samples] and labels.levels == [70, 140]
    builder = BatchBuilder(model.geometry, model.text, model.text_format.text_config(max_length=10**6), DecodingConfig())
    embeddings = model.model.lm.get_input_embeddings()
    for row, sample in enumerate(samples):  # one sample at a time, unpacked: full logits, cross-entropy by hand
        for column, level in enumerate(labels.levels):
            inputs = builder.collate([builder.encode(sample, level)], level).inputs
            logits, targets = model.model(inputs)[0, :-1], inputs.labels[0, 1:]
            counted = targets != IGNORE_INDEX
            expected = F.cross_entropy(logits[counted], targets[counted])
            assert labels.losses[row, column] == pytest.approx(float(expected), rel=1e-5)
        inputs = builder.collate([builder.encode(sample, 70)], 70).inputs
        ids = inputs.input_ids[0]
        question = ids[(inputs.labels[0] == IGNORE_INDEX) & (ids != model.model.image_token_id)]
        visual = model.model.encode_images(inputs.images)
        expected = torch.cat([visual.mean(dim=0), embeddings(question).mean(dim=0)])
        torch.testing.assert_close(labels.features[row], expected, rtol=1e-5, atol=1e-6)
    assert labels.gaps().min() == 0 and (labels.gaps().min(dim=1).values == 0).all()


@pytest.mark.slow
def test_a_selector_trained_where_small_text_needs_1120_picks_1120_for_small_and_70_for_large_text(tmp_path, capsys):
    # the demo's ViT, pre-trained to read the words; labels: small text loses 1 nat/token below 1120, large nothing
    demo_dir = tmp_path / "demo"
    make_demo_shards(demo_dir, train_samples=96, val_samples=16, seed=2, samples_per_shard=48)
    recipe = load_recipe(TINY, [f"run_dir={tmp_path / 'run'}", "budget.levels=[70,1120]", "budget.default=70", "logger=none"])
    write_export(exported(recipe), recipe, tmp_path / "export")
    train = f"{demo_dir}/train-{{000000..000001}}.tar"
    labels = tmp_path / "labels"
    assert main(["label-budgets", str(tmp_path / "export"), "--data", train, "--limit", "96", "--out", str(labels)]) == 0
    assert "labelled 96 images (96 samples) at 2 levels" in capsys.readouterr().out
    sizes = {s.key: s.record["size"] for index in range(2) for s in read_shard(f"{demo_dir}/train-{index:06d}.tar")}
    keys = json.loads((labels / "labels.json").read_text())["keys"]
    tensors = load_file(labels / "labels.safetensors")
    tensors["losses"] = torch.tensor([[1.0 if sizes[key] == "small" else 0.0, 0.0] for key in keys])
    save_file(tensors, labels / "labels.safetensors")
    assert main(["train-selector", str(tmp_path / "export"), "--labels", str(labels)]) == 0

    model = load(tmp_path / "export")
    held_back = [s for s in read_shard(f"{demo_dir}/val-000000.tar") if isinstance(s, RawSample)]
    assert {s.record["size"] for s in held_back} == {"small", "large"}
    for sample in held_back:
        image = decode_image(sample.images[0], max_pixels=10**8)
        chosen = model.auto_budgets([image], None, None, tolerance=0.5)  # halfway between the two labels' gaps
        assert chosen == [1120 if sample.record["size"] == "small" else 70], sample.key
        assert model.inputs([image], budget="auto:0.5")[1].token_counts.tolist() == [
            model.geometry.image(image.height, image.width, chosen[0]).tokens
        ]
    assert isinstance(model.generate([image], budget="auto:0.5", max_new_tokens=2), str)

    # auto reuses the selector's pass at 70: the encoder runs again only for the images it sends higher
    first = {size: next(s for s in held_back if s.record["size"] == size) for size in ("small", "large")}
    small, large = (decode_image(first[size].images[0], max_pixels=10**8) for size in ("small", "large"))
    patches = []
    model.model.backbone.register_forward_hook(lambda module, args, output: patches.append(len(args[0])))
    prompt = "<image> and <image>: "
    for pair, budgets in (([small, large], [1120, 70]), ([large, large], [70, 70])):
        patches.clear()
        found = model.logits(pair, prompt, budget="auto:0.5")
        at = [model.geometry.image(i.height, i.width, b).patches for i, b in zip(pair, budgets, strict=True)]
        selector_pass = sum(model.geometry.image(i.height, i.width, 70).patches for i in pair)
        higher = [count for count, b in zip(at, budgets, strict=True) if b != 70]
        assert patches == [selector_pass, *([sum(higher)] if higher else [])]
        expected = model.logits(pair, prompt, budget=budgets)
        torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-5)

    # eval puts auto beside the fixed budgets: what it chose, and the visual tokens that cost
    data = f"{demo_dir}/val-000000.tar"
    results = evaluate([tmp_path / "export"], data, [70, 1120, "auto:0.5"], limit=16, out=tmp_path / "eval", generate=False)
    fixed70, fixed1120, auto = results["models"][0]["budgets"]
    small = sum(s.record["size"] == "small" for s in held_back)
    assert auto["budget"] == "auto:0.5" and auto["chosen"] == {"70": 16 - small, "1120": small}
    spent = [model.geometry.image(*s.sizes[0], 1120 if s.record["size"] == "small" else 70).tokens for s in held_back]
    assert auto["visual_tokens_per_image"] == pytest.approx(sum(spent) / 16)
    assert fixed70["visual_tokens_per_image"] < auto["visual_tokens_per_image"] < fixed1120["visual_tokens_per_image"]
    assert (tmp_path / "eval" / "eval.png").is_file()
    with pytest.raises(UserError, match="'auto:x'"):
        model.generate([image], budget="auto:x")


def test_auto_without_a_selector_is_one_line(demo_dir, tmp_path):
    recipe = small_recipe(demo_dir, tmp_path / "run")
    write_export(exported(recipe), recipe, tmp_path / "export")
    image = decode_image(next(s for s in read_shard(f"{demo_dir}/val-000000.tar")).images[0], max_pixels=10**8)
    with pytest.raises(UserError, match="no budget selector"):
        load(tmp_path / "export").generate([image], budget="auto")


def selector_predicting(gaps: list[float]) -> BudgetSelector:
    """A selector over the five levels that predicts ``gaps`` for any image (its last layer: zeros and a bias)."""
    selector = BudgetSelector(features=8, levels=[70, 140, 280, 560, 1120])
    with torch.no_grad():
        selector.net[-1].weight.zero_()
        selector.net[-1].bias.copy_(torch.tensor(gaps))
    return selector


@pytest.mark.parametrize(
    "gaps, tolerance, chosen",
    [
        ([0.5, 0.2, 0.04, 0.0, 0.01], 0.05, 280),  # the cheapest level within the tolerance, not the best one
        ([0.5, 0.2, 0.04, 0.0, 0.01], 0.0, 560),  # only the best is within a tolerance of 0
        ([0.03, 0.0, 0.0, 0.0, 0.0], 0.05, 70),
        ([0.3, 0.2, 0.25, 0.1, 0.15], 0.05, 560),  # none within: the level predicted best
        ([0.3, 0.2, 0.25, 0.15, 0.1], 0.05, 1120),
    ],
)
def test_auto_picks_the_cheapest_level_within_the_tolerance_or_else_the_best(gaps, tolerance, chosen):
    features = torch.randn(3, 8)
    assert selector_predicting(gaps).choose(features, tolerance) == [chosen] * 3
