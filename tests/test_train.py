"""Training: a real (tiny) fit on CPU, stage freezing, per-part learning rates, the schedule check, the CLI."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from helpers import ROOT, TINY, built, small_overrides, small_recipe
from safetensors.torch import load_file

from vlmtrain.config import OptimConfig, RecipeError, load_recipe
from vlmtrain.plan import plan_run
from vlmtrain.train.layout import latest_checkpoint
from vlmtrain.train.module import VLMModule
from vlmtrain.train.optim import learning_rate_schedule
from vlmtrain.train.run import fit


def initial_state(recipe) -> dict[str, torch.Tensor]:
    """The weights a fit of ``recipe`` starts from."""
    return {name: value.clone() for name, value in built(recipe).state_dict().items()}


def checkpoint_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(latest_checkpoint(run_dir / "checkpoints") / "state", map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_fit_writes_checkpoint_metrics_resolved_recipe_and_summary(demo_dir, tmp_path):
    recipe = small_recipe(demo_dir, tmp_path / "run")
    run_dir = fit(recipe)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-000000002", "step-000000004"]
    latest = latest_checkpoint(run_dir / "checkpoints")
    assert latest.name == "step-000000004" and sorted(p.name for p in latest.iterdir()) == ["state", "trained.safetensors"]
    trained = load_file(latest / "trained.safetensors")
    assert set(trained) == {name for name, p in built(recipe).named_parameters() if p.requires_grad}
    assert load_recipe(run_dir / "recipe.yaml") == recipe
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()
    rows = list(csv.DictReader((run_dir / "metrics" / "version_0" / "metrics.csv").open()))
    trained = {int(float(r["budget"])) for r in rows if r.get("budget")}
    assert trained == {70, 140}
    for name in (
        "train/loss",
        "train/data_wait_s",
        "data/padding",
        "data/samples",
        "skipped",
        *(f"{kind}@{budget}" for kind in ("train/loss", "train/images_per_s", "train/visual_tokens_per_s") for budget in trained),
        *(f"val/loss@{budget}{group}" for budget in (70, 140) for group in ("", "/large", "/small")),
    ):
        assert any(row.get(name) for row in rows), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert sorted(summary["budgets"]) == ["140", "70"] and [r["step"] for r in summary["val_rounds"]] == [2, 4]
    steps = {budget: sum(1 for r in rows if r.get(f"train/loss@{budget}")) for budget in (70, 140)}
    assert {int(b): row["steps"] for b, row in summary["budgets"].items()} == steps
    last = {(b, g): float(rows[-1][f"val/loss@{b}{g}"]) for b in (70, 140) for g in ("", "/large", "/small")}
    for budget in (70, 140):
        found = summary["val_rounds"][-1]["budgets"][str(budget)]
        assert found["loss"] == pytest.approx(last[(budget, "")])
        assert found["groups"] == pytest.approx({"large": last[(budget, "/large")], "small": last[(budget, "/small")]})
    with pytest.raises(RecipeError, match="already holds checkpoints"):
        fit(recipe)


class BatchLog(L.Callback):
    """Records (step, budget, sample keys) of every trained batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, list[str]]] = []

    def on_train_batch_end(self, trainer, module, outputs, step, batch_idx) -> None:
        self.seen.append((step.index, step.budgets[0], list(step.batches[0].keys)))


def fit_logged(recipe) -> list[tuple[int, int, list[str]]]:
    log = BatchLog()
    fit(recipe, callbacks=[log])
    return log.seen


@pytest.mark.slow
def test_a_resumed_run_sees_exactly_the_batches_of_an_uninterrupted_one(demo_dir, tmp_path):
    common = ("data.num_workers=2", "data.val=null", "trainer.checkpoint_every=3", "logger=none")
    whole = fit_logged(small_recipe(demo_dir, tmp_path / "whole", "trainer.max_steps=7", *common))
    first = fit_logged(small_recipe(demo_dir, tmp_path / "cut", "trainer.max_steps=3", *common))
    rest = fit_logged(small_recipe(demo_dir, tmp_path / "cut", "trainer.max_steps=7", "resume=auto", *common))
    assert [step for step, *_ in whole] == list(range(7))
    assert first + rest == whole


def test_resume_needs_an_existing_checkpoint_and_never_overwrites(demo_dir, tmp_path):
    with pytest.raises(RecipeError, match="'/nope' is not a checkpoint directory"):
        fit(small_recipe(demo_dir, tmp_path / "r", "resume=/nope"))
    with pytest.raises(RecipeError, match="cannot resume and overwrite"):
        small_recipe(demo_dir, tmp_path / "r", "resume=auto", "overwrite=true")


def test_overwrite_starts_a_clean_run_whose_recipe_works_from_anywhere(demo_dir, tmp_path, monkeypatch):
    # overwrite=true once removed only the checkpoints: the new run continued the old W&B run beside old metrics
    from vlmtrain.data.sources import expand_shards
    from vlmtrain.train.run import prepare_run_dir

    run = tmp_path / "run"
    earlier = ["checkpoints/step-000000002/trained.safetensors", "metrics/version_0/metrics.csv", "wandb/run-1/x.wandb",
               "wandb-run-id", "summary.json", "tokenizer/tokenizer.json", "adapter/adapter_model.safetensors",
               "eval/eval.json", "last-eval.txt"]
    for name in [*earlier, "notes.txt"]:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("earlier")
    monkeypatch.chdir(demo_dir)  # paths relative to where the run starts
    relative = ["data.train=train-{000000..000003}.tar", "data.val=./val-000000.tar", "data.text.chat_template=chatml",
                "model.lm.tokenizer=byte"]
    with pytest.raises(RecipeError, match="already holds checkpoints; pass resume=auto, overwrite=true"):
        prepare_run_dir(small_recipe(demo_dir, run, *relative))
    prepare_run_dir(small_recipe(demo_dir, run, *relative, "overwrite=true"))
    assert sorted(path.name for path in run.iterdir()) == ["notes.txt", "recipe.yaml"]

    monkeypatch.chdir(tmp_path)
    again = load_recipe(run / "recipe.yaml")
    assert (again.data.train, again.data.val) == (f"{demo_dir}/train-{{000000..000003}}.tar", f"{demo_dir}/val-000000.tar")
    assert len(expand_shards(again.data.train)) == 4 and again.run_dir == str(run)
    assert again.data.text.chat_template == "chatml" and again.model.lm.tokenizer == "byte"
    assert not again.overwrite  # `vlmtrain fit RUN/recipe.yaml resume=auto` continues the run

    (run / "wandb-run-id").write_text("earlier")  # a run that stopped before its first checkpoint: a new start
    prepare_run_dir(small_recipe(demo_dir, run))  # (no checkpoint, so no overwrite needed) is a new W&B run
    assert not (run / "wandb-run-id").exists()


def test_checking_a_resume_reads_no_start_weights(demo_dir, tmp_path):
    # the check builds the model on the meta device: reading the ViT's start weights into it printed ~120 warnings
    import warnings

    from safetensors.torch import save_file

    from vlmtrain.train.preflight import check_resume

    reader = ["model.vision.path=" + str(ROOT / "data" / "weights" / "tiny-reader.safetensors"), "model.vision.width=128",
              "model.vision.depth=4", "model.vision.heads=4"]
    recipe = small_recipe(demo_dir, tmp_path / "run", *reader)
    trained = {f"model.{name}": p.detach() for name, p in built(recipe).model.named_parameters() if p.requires_grad}
    (tmp_path / "step" / "state").mkdir(parents=True)
    save_file(trained, tmp_path / "step" / "trained.safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_resume(plan_run(recipe), "recipe", tmp_path / "step" / "state")
    assert [str(warning.message) for warning in caught] == []


@pytest.mark.slow
def test_checkpoints_hold_only_what_trained_and_it_changed(demo_dir, tmp_path):
    recipe = small_recipe(
        demo_dir, tmp_path / "frozen", "optim.vision.trainable=false", "optim.lm.trainable=false", "logger=none"
    )
    before = initial_state(recipe)
    after = checkpoint_state(fit(recipe))
    assert not any(name.startswith(("model.backbone.", "model.lm.")) for name in after)  # frozen: not saved
    projector = [name for name in before if name.startswith("model.projector.")]
    assert set(after) == set(projector)
    assert any(not torch.equal(after[name], before[name]) for name in projector)


def test_each_part_gets_its_own_learning_rate(demo_dir, tmp_path):
    recipe = small_recipe(
        demo_dir,
        tmp_path / "x",
        "optim.vision.lr=0.003",
        "optim.projector.lr=0.002",
        "optim.lm.lr=0.001",
        "optim.weight_decay=0.1",
    )
    module = built(recipe)
    groups = {group["name"]: group for group in module.configure_optimizers()["optimizer"].param_groups}
    assert {name: group["initial_lr"] for name, group in groups.items()} == {
        "vision": 0.003,
        "vision/no_decay": 0.003,
        "projector": 0.002,
        "projector/no_decay": 0.002,
        "lm": 0.001,
        "lm/no_decay": 0.001,
    }
    assert recipe.optim.warmup_steps > 0 and all(group["lr"] == 0.0 for group in groups.values())  # warm-up from 0
    assert groups["vision"]["weight_decay"] == 0.1 and groups["lm/no_decay"]["weight_decay"] == 0.0
    without_decay = built(small_recipe(demo_dir, tmp_path / "y", "optim.weight_decay=0"))
    names = [group["name"] for group in without_decay.configure_optimizers()["optimizer"].param_groups]
    assert len(names) == len(set(names)) == 6
    optimized = {id(p) for group in groups.values() for p in group["params"]}
    assert optimized == {id(p) for p in module.parameters() if p.requires_grad}


def learning_rates(schedule: str, steps: int) -> list[float]:
    """The learning rate of each step (peak 1) under the recipe's ``schedule``: 10 warm-up steps, 110 in all."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = learning_rate_schedule(optimizer, OptimConfig(warmup_steps=10, schedule=schedule, min_lr_ratio=0.1), 110)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cosine = learning_rates("cosine", 111)
    assert cosine[:3] == pytest.approx([0.0, 0.1, 0.2]) and cosine[9] == pytest.approx(0.9)
    assert cosine[10] == pytest.approx(1.0) and cosine[60] == pytest.approx(0.55) and cosine[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in pairwise(cosine[10:]))
    assert learning_rates("constant", 500)[10:] == pytest.approx([1.0] * 490)


def test_a_batch_with_the_wrong_budget_is_refused(demo_dir, tmp_path):
    module = VLMModule(plan_run(small_recipe(demo_dir, tmp_path / "x")))
    index = next(s for s in range(100) if module.plan.schedule.sample(s) == 70)

    with pytest.raises(RuntimeError, match=f"batch at step {index} has budgets \\(140,\\), the schedule says \\(70,\\)"):
        module.check_schedule(SimpleNamespace(budgets=(140,), index=index))


@pytest.mark.slow
def test_matryoshka_trains_every_budget_each_step(demo_dir, tmp_path):
    recipe = small_recipe(demo_dir, tmp_path / "m", "budget.mode=matryoshka", "trainer.max_steps=2", "data.val=null")
    rows = list(csv.DictReader((fit(recipe) / "metrics" / "version_0" / "metrics.csv").open()))
    steps_with = {budget: {r["step"] for r in rows if r.get(f"train/loss@{budget}")} for budget in (70, 140)}
    assert steps_with[70] == steps_with[140] and len(steps_with[70]) == 2


@pytest.mark.slow
def test_cli_fit_runs_the_tiny_recipe(demo_dir, tmp_path):
    overrides = small_overrides(demo_dir, tmp_path / "cli", "data.num_workers=1", "trainer.max_steps=2")
    result = subprocess.run([sys.executable, "-m", "vlmtrain.cli", "fit", str(TINY), *overrides], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"run finished: {tmp_path / 'cli'}" in result.stdout
    assert latest_checkpoint(tmp_path / "cli" / "checkpoints") is not None


def test_summary_table_shows_each_groups_last_validation_loss_per_budget():
    from vlmtrain.train.callbacks import format_summary

    row = {"steps": 3, "train_loss_first_quarter": 2.0, "train_loss_last_quarter": 1.0, "images_per_s": 5.0}
    rounds = [
        {"step": 1, "budgets": {70: {"loss": 0.9, "groups": {}}, 1120: {"loss": 0.8, "groups": {}}}},
        {
            "step": 2,
            "budgets": {70: {"loss": 0.5, "groups": {"large": 0.1, "small": 0.9}}, 1120: {"loss": 0.4, "groups": {"large": 0.3}}},
        },
    ]
    lines = format_summary({"budgets": {70: row, 1120: row}, "val_rounds": rounds}).splitlines()
    assert lines[0].endswith("last val: large  last val: small")
    assert lines[1].split()[-3:] == ["5.0", "0.100", "0.900"] and "0.900 → 0.500" in lines[1]
    assert lines[2].split()[-3:] == ["5.0", "0.300", "-"]


@pytest.mark.slow
def test_compiled_layers_compute_the_eager_losses_and_gradients_and_a_new_length_recompiles_nothing(demo_dir, tmp_path):
    from helpers import losses_and_grads
    from torch._dynamo.utils import counters

    from vlmtrain.data.sources import read_shard
    from vlmtrain.train.run import batch_builder

    overrides = ("model.lm.hf_config.num_hidden_layers=2", "model.lm.lora.rank=4", "model.lm.lora.target_modules=[q_proj,v_proj]")
    eager = built(small_recipe(demo_dir, tmp_path / "eager", *overrides)).model.eval()  # no dropout: the same numbers
    module = built(small_recipe(demo_dir, tmp_path / "compiled", *overrides, "trainer.compile=true"))
    compiled = module.model.eval()
    layers = compiled.transformers_lm().get_decoder().layers
    assert len(layers) == 2 and all(layer._compiled_call_impl is not None for layer in layers)
    builder = batch_builder(module.plan)
    samples = list(read_shard(f"{demo_dir}/train-000000.tar"))
    counters.clear()
    for count in (2, 4, 6):  # three packed lengths
        inputs = builder.collate([builder.encode(sample, 70) for sample in samples[:count]], 70).inputs
        (plain, plain_grads), (fast, fast_grads) = losses_and_grads(eager, inputs), losses_and_grads(compiled, inputs)
        torch.testing.assert_close(fast.loss_sum, plain.loss_sum, rtol=1e-5, atol=1e-5)
        assert set(fast_grads) == set(plain_grads)
        for name, grad in plain_grads.items():  # fused kernels sum in another order: relative to the gradient's size
            assert (fast_grads[name] - grad).norm() <= 1e-4 * grad.norm() + 1e-7, name
    assert counters["stats"]["unique_graphs"] > 0  # it did compile
    assert sum(counters["recompiles"].values()) == 0
    with pytest.raises(RecipeError, match="trainer.compile: is tested with trainer.strategy auto, ddp and fsdp, not deepspeed"):
        small_recipe(demo_dir, tmp_path / "z", "trainer.compile=true", "trainer.strategy=deepspeed")
