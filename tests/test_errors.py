"""Every failure is one clear line, early: mistakes a recipe, a path or the data can hold, as a user meets them
through the CLI (exit code 2 for the user's mistakes, 1 for failures of the run; VLMTRAIN_DEBUG=1 shows the
traceback), and silent acceptances turned into counted skips."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ENV, IMAGES, ROOT, TINY, processes_mentioning, record, run_cli, small_overrides, small_recipe, write_tar

from vlmtrain.data.pipeline import DataError, TrainStream
from vlmtrain.data.sources import Source
from vlmtrain.train.layout import latest_checkpoint


def cli(*args: str, env: dict | None = None, timeout: int = 300) -> tuple[int, list[str], float]:
    """(exit code, stderr lines, seconds) of ``vlmtrain ARGS``."""
    began = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "vlmtrain.cli", *args], capture_output=True, text=True, env=env or ENV, timeout=timeout
    )
    return result.returncode, result.stderr.strip().splitlines(), time.monotonic() - began


def fit_error(demo_dir: Path, tmp_path: Path, *overrides: str) -> tuple[int, str, float]:
    code, lines, seconds = cli("fit", str(TINY), *small_overrides(demo_dir, tmp_path / "run", *overrides))
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(lines), lines
    return code, errors[0], seconds


FAST_FAILURES = [
    (
        ("model.lm.hf_config.hiden_size=64",),
        "model.lm.hf_config.hiden_size: not a key of LlamaConfig; did you mean 'hidden_size'?",
    ),
    (
        ("model.lm.hf_config.model_type=lama",),
        "model.lm.hf_config.model_type: 'lama' is not a transformers model type; close: llama",
    ),
    (
        (
            "model.vision.backbone=siglip2",
            "model.vision.path=null",
            "model.vision.patch_size=null",
            "model.vision.hf_config={hidden_sise: 32}",
        ),
        "model.vision.hf_config.hidden_sise: not a key of Siglip2VisionConfig; did you mean 'hidden_size'?",
    ),
    (("trainer.devices=99",), "trainer.devices: 99 processes, but this machine has"),
    (("trainer.accelerator=gpu",), "trainer.accelerator: gpu, but no CUDA GPU is visible on this machine"),
    (
        ("model.lm.lora.rank=4", "model.lm.lora.target_modules=[q_proj,query]"),
        "model.lm.lora.target_modules: the LM has no 'query' layers; its linear layers: down_proj, gate_proj, k_proj, lm_head, "
        "o_proj, q_proj, up_proj, v_proj",
    ),
    (
        ("model.vision.lora.rank=4", "model.vision.lora.target_modules=[qkv,q_proj]"),
        "model.vision.lora.target_modules: the vision encoder has no 'q_proj' layers; its linear layers: mlp.0, mlp.2, proj, qkv",
    ),
    (
        ("model.projector.lora.rank=2", "model.projector.lora.target_modules=[mlp.0,fc1]"),
        "model.projector.lora.target_modules: the projector has no 'fc1' layers; its linear layers: mlp.0, mlp.2",
    ),
    (("data.text.target_field=caption",), "data.text.target_field: 'caption' is in none of the first 6 records of"),
    (
        ("data.train=/nope/train-{000000..000003}.tar",),
        "data.train: shard spec '/nope/train-{000000..000003}.tar': 4 of 4 shards not found",
    ),
    (("data.val=/nope/val.tar",), "data.val: shard spec '/nope/val.tar': 1 of 1 shards not found"),
    (
        ("model.lm.path=/nope/llama", "model.lm.hf_config=null"),
        "model.lm.path: '/nope/llama' is not a folder (a local Hugging Face model; nothing is downloaded)",
    ),
    (("model.lm.tokenizer=/nope/tok",), "model.lm.tokenizer: '/nope/tok' is not a folder"),
    (("model.vision.path=/nope/vit.safetensors",), "model.vision.path: '/nope/vit.safetensors' not found"),
    (("resume=/nope",), "resume: '/nope' is not a checkpoint directory"),
    (("model.pooling.size=40",), "model.pooling.size: patch 16 x pool 40: one token covers 640x640 px"),
    (("budget.weights=[.nan,1]",), "budget.weights[0]: nan is not a finite number"),
    (  # every sample would be skipped: found before the models load, not after a thousand samples
        ("data.text.max_length=2",),
        "data.text.max_length: 2, but each of the first 6 records of",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, message", FAST_FAILURES, ids=[case[1].split(":")[0] + str(i) for i, case in enumerate(FAST_FAILURES)]
)
def test_a_mistake_stops_the_run_in_seconds_with_one_line_naming_it(demo_dir, tmp_path, overrides, message):
    code, error, seconds = fit_error(demo_dir, tmp_path, *overrides)
    assert code == 2 and message in error, error
    assert seconds < 10, f"{seconds:.1f} s"
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_refused_naming_the_tensor(demo_dir, tmp_path):
    run_cli(small_overrides(demo_dir, tmp_path / "run", "trainer.max_steps=2", "data.val=null"))
    code, error, _ = fit_error(demo_dir, tmp_path, "model.vision.width=64", "resume=auto", "trainer.max_steps=4", "data.val=null")
    assert code == 2
    assert error.startswith(
        f"error: {TINY}: resume: {tmp_path / 'run' / 'checkpoints' / 'step-000000002'} does not fit the recipe: model.backbone."
    )
    assert "(check model.vision)" in error


@pytest.mark.slow
def test_resume_auto_without_a_checkpoint_says_the_run_starts_from_step_0(demo_dir, tmp_path):
    code, lines, _ = cli(
        "fit", str(TINY), *small_overrides(demo_dir, tmp_path / "run", "resume=auto", "trainer.max_steps=1", "data.val=null")
    )
    assert code == 0 and f"resume=auto: no checkpoint in {tmp_path / 'run' / 'checkpoints'}; the run starts from step 0" in lines


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (
            ("geometry", "-5x10"),
            "error: vlmtrain geometry: the following arguments are required: size (-5x10: an image size must be positive",
        ),
        (("geometry", "640x480", "--pool", "0"), "error: vlmtrain geometry: argument --pool: must be >= 1, got 0"),
        (("eval", "x", "--data", "y", "--limit", "0"), "error: vlmtrain eval: argument --limit: must be >= 1, got 0"),
        (("label-budgets", "x", "--data", "y", "--limit", "-1", "--out", "z"),
         "error: vlmtrain label-budgets: argument --limit: must be >= 1, got -1"),
        (("train-selector", "x", "--labels", "y", "--steps", "0"),
         "error: vlmtrain train-selector: argument --steps: must be >= 1"),
        (("eval", "x", "--data", "y", "--out", "README.md"),
         "error: vlmtrain eval: argument --out: README.md is a file; give a folder"),
        (("geometry", "0x480"), "error: image size '0x480' must be positive"),
        (
            ("eval", "x", "--data", "y", "--budgets", "70,abc"),
            "error: --budgets '70,abc' must be token levels, auto[:TOL] or record separated by commas",
        ),
        (
            ("eval", "x", "--data", "y", "--budgets", ","),
            "error: --budgets ',' must be token levels, auto[:TOL] or record separated by commas",
        ),
        (
            ("eval", "x", "--data", "y", "--budgets", "70,auto:x"),
            "error: budget 'auto:x': a level, a list of levels, 'auto' or 'auto:TOL' with TOL >= 0 (e.g. auto:0.1)",
        ),
        (
            ("eval", "x", "--data", "y", "--budgets", "70,100"),
            "error: token budget 100 is not allowed; allowed levels: 70, 140, 280, 560, 1120",
        ),
        (("validate", "recipes/nope.yaml"), "error: recipe 'recipes/nope.yaml' not found"),
    ],
)
def test_command_line_mistakes_are_one_line_and_exit_2(args, message):
    code, lines, _ = cli(*args)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(message), lines


@pytest.mark.slow
def test_a_failure_of_the_run_is_one_line_exit_1_and_its_traceback_on_demand(demo_dir, tmp_path):
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    overrides = ("data.val=null", f"data.train={empty}", "data.num_workers=0")
    code, error, _ = fit_error(demo_dir, tmp_path, *overrides)
    assert (
        code == 2
        and error.startswith(f"error: shard {empty} ")
        and error.endswith("read 3 times with no usable sample from any shard in between")
    )
    debug = subprocess.run(
        [sys.executable, "-m", "vlmtrain.cli", "fit", str(TINY), *small_overrides(demo_dir, tmp_path / "again", *overrides)],
        capture_output=True,
        text=True,
        env={**ENV, "VLMTRAIN_DEBUG": "1"},
    )
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr


def test_a_stream_of_a_failing_pipe_stops_after_a_few_attempts_naming_the_shard(tmp_path):
    from test_data import chat_builder, settings

    from vlmtrain.budget import BudgetSchedule

    marker = tmp_path / "spawned"
    spec = f"pipe:echo x >> {marker}; exit 3"
    stream = TrainStream([Source((spec,))], chat_builder(), BudgetSchedule.uniform(), settings(max_consecutive_failures=1000))
    with pytest.raises(DataError, match=r"shard pipe:echo .* cannot be opened|shard pipe:echo .* broke off|holds no sample"):
        next(stream.steps(0, 1, 0))
    assert len(marker.read_text().splitlines()) == 3  # three attempts, not a thousand shell spawns


@pytest.mark.slow
def test_secrets_from_the_environment_stay_out_of_the_run_directory(demo_dir, tmp_path):
    env = {**ENV, "VLMTRAIN_TEST_SECRET": "s3cr3t-token"}
    overrides = small_overrides(
        demo_dir,
        tmp_path / "run",
        "trainer.max_steps=1",
        "data.val=null",
        "logger=wandb",
        "data.text.prompt=<image>${oc.env:VLMTRAIN_TEST_SECRET}",
    )
    code, lines, _ = cli("fit", str(TINY), *overrides, env=env)
    assert code == 0, lines
    written = (tmp_path / "run" / "recipe.yaml").read_text()
    assert "prompt: <image>${oc.env:VLMTRAIN_TEST_SECRET}" in written and "s3cr3t" not in written
    files = [path for path in (tmp_path / "run").rglob("*") if path.is_file()]
    assert any(path.suffix == ".wandb" for path in files)
    assert not [path for path in files if b"s3cr3t" in path.read_bytes()]


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(demo_dir, tmp_path, monkeypatch):
    import lightning as L

    from vlmtrain.train.checkpoints import CheckpointError
    from vlmtrain.train.run import fit

    recipe = small_recipe(
        demo_dir, tmp_path / "run", "data.val=null", "logger=none", "trainer.max_steps=4", "trainer.checkpoint_every=2"
    )
    original = L.Trainer.save_checkpoint

    def full_at_step_4(trainer, path, *args, **kwargs):
        if trainer.global_step == 4:
            raise OSError(errno.ENOSPC, "No space left on device", "/tmp/tmpabc123")
        return original(trainer, path, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "save_checkpoint", full_at_step_4)
    with pytest.raises(CheckpointError) as caught:
        fit(recipe)
    step2 = tmp_path / "run" / "checkpoints" / "step-000000002"
    assert str(caught.value) == (
        f"no space left writing {tmp_path / 'run' / 'checkpoints' / 'step-000000004'}: No space left on device at "
        "/tmp/tmpabc123 (Lightning writes a checkpoint to a temporary file in /tmp first: /tmp is the one that is full); "
        f"the last complete checkpoint, {step2}, is untouched"
    )
    assert latest_checkpoint(tmp_path / "run" / "checkpoints") == step2
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["latest", "step-000000002"]


def test_an_empty_target_is_skipped_and_counted(tmp_path):
    from test_data import chat_builder, png, record, settings, write_tar

    from vlmtrain.budget import BudgetSchedule

    files = [
        ("a.json", record("word", (40, 30))),
        ("a.0.png", png(40, 30)),
        ("b.json", record("  ", (40, 30))),
        ("b.0.png", png(40, 30)),
        ("c.json", record("more", (40, 30))),
        ("c.0.png", png(40, 30)),
    ]
    stream = TrainStream(
        [Source((write_tar(tmp_path / "s.tar", files),))], chat_builder(), BudgetSchedule.uniform((70,)), settings(lookahead=3)
    )
    step = next(stream.steps(0, 1, 0))
    assert sorted(step.batches[0].keys) == ["a", "c"] and step.position.state["skipped"] == {"empty_target": 1}


@pytest.mark.slow
def test_eval_at_a_budget_the_model_never_trained_at_warns(demo_dir, tmp_path):
    run_cli(small_overrides(demo_dir, tmp_path / "run", "trainer.max_steps=1", "data.val=null"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlmtrain.cli",
            "eval",
            str(tmp_path / "run"),
            "--data",
            f"{demo_dir}/val-000000.tar",
            "--budgets",
            "70,280",
            "--limit",
            "2",
            "--no-generate",
            "--out",
            str(tmp_path / "eval"),
        ],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "warning: trained at 70, 140 only: 280 never seen in training" in result.stdout
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["models"][0]["warnings"] == [
        "trained at 70, 140 only: 280 never seen in training"
    ]


def test_shards_refuse_a_path_out_of_the_images_folder_before_reading_it(tmp_path):
    from vlmtrain.data.shards import write_shards

    report = write_shards([{"key": "x", "images": ["/etc/passwd"], "text": "x"}], IMAGES, tmp_path / "out", "s", 10)
    assert report.rejected == [
        ("x", "image '/etc/passwd' is outside " + repr(str(IMAGES)) + " (--allow-outside-images reads it)")
    ]
    assert os.path.exists("/etc/passwd")


def unusable_shard(tmp_path: Path, case: str) -> str:
    """A shard of 300 unusable records: after 8 fine ones (pre-flight reads them), texts far longer than the
    recipe's data.text.max_length; or records (fine as pre-flight reads them) whose images are broken bytes."""
    files = [(f"a{i:03d}.json", record("word")) for i in range(8)] if case == "texts too long" else []
    for i in range(300):
        if case == "texts too long":
            files.append((f"b{i:03d}.json", record("word " * 100)))
        else:
            files += [(f"b{i:03d}.json", record("word", (64, 48))), (f"b{i:03d}.0.png", b"broken")]
    return write_tar(tmp_path / "unusable-000000.tar", files)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["texts too long", "images broken"])
def test_a_run_with_nothing_usable_exits_2_in_seconds_and_leaves_no_process(demo_dir, tmp_path, case):
    # a failing run once hung forever: its data workers ignore SIGTERM, which multiprocessing sends them at exit
    # before waiting for them; and a stream of broken images never counted as failures in a row
    run_dir = tmp_path / "run"
    code, line, seconds = fit_error(demo_dir, tmp_path, f"data.train={unusable_shard(tmp_path, case)}", "data.resampled=true",
                                    "data.num_workers=2", "data.val=null", "data.max_consecutive_failures=200")
    assert code == 2 and "201 samples in a row were unusable; last (" in line, line
    assert ("text_too_long" if case == "texts too long" else "image") in line
    assert seconds < 30 and processes_mentioning(str(run_dir)) == []


def test_preflight_refuses_a_token_cap_that_no_first_record_fits(chat_dir, tmp_path):
    # two-image conversations: the recipe's check (one image at 1120 + max_length) passes, every sample is over
    from vlmtrain.config import RecipeError, load_recipe
    from vlmtrain.plan import plan_run
    from vlmtrain.train.preflight import check_records

    chat = ROOT / "recipes" / "chat-tiny.yaml"
    data = [f"data.train={chat_dir}/train-{{000000..000003}}.tar", "data.val=null", "model.vision.path=null",
            "data.text.max_length=210"]
    with pytest.raises(RecipeError, match=r"^recipe: data.batching.batch_tokens: 1330, but each of the first 6 records of "
                                          r".*train-000000.tar needs more LM tokens at the largest budget \(13[3-9]\d-2\d{3}, "):
        check_records(plan_run(load_recipe(chat, [*data, "data.batching.batch_tokens=1330"])), "recipe")
    check_records(plan_run(load_recipe(chat, [*data, "data.batching.batch_tokens=2600"])), "recipe")


class Payload:
    """What a malicious pickle carries: loading it would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_a_pickle_in_place_of_weights_or_a_checkpoint_is_one_line_and_never_runs(demo_dir, tmp_path):
    import torch

    marker, evil = tmp_path / "ran", tmp_path / "vit.safetensors"
    torch.save({"weights": Payload(marker)}, evil)
    code, error, _ = fit_error(demo_dir, tmp_path, f"model.vision.path={evil}", "model.vision.width=128",
                               "model.vision.depth=4", "model.vision.heads=4", "trainer.max_steps=1")
    assert code == 2 and error.startswith(f"error: {evil}: not a readable safetensors file ("), error
    run_cli(small_overrides(demo_dir, tmp_path / "run", "trainer.max_steps=2", "data.val=null"))
    state = latest_checkpoint(tmp_path / "run" / "checkpoints") / "state"
    torch.save({"state_dict": Payload(marker)}, state)
    code, error, _ = fit_error(demo_dir, tmp_path, "resume=auto", "trainer.max_steps=4", "data.val=null")
    assert code == 2 and error == (f"error: resume: {state} holds Python objects that loading would run (refused: only "
                                   "tensors and plain values are read); it is not a checkpoint vlmtrain wrote")
    assert not marker.exists()
