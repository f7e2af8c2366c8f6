"""Several processes on CPU (gloo): DDP, FSDP2 and DeepSpeed ZeRO-2/3 with LoRA, ranks that must agree, resume after
SIGKILL, torchrun. Every test here starts processes: all are marked slow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import (
    ENV,
    GEMMA4_TOWER,
    LORA,
    TINY,
    TINY_LLAMA,
    TWO_PROCESSES,
    built,
    losses,
    run_cli,
    save_as_full_checkpoint,
    small_overrides,
    two_process_run,
)
from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from vlmtrain.config import load_recipe
from vlmtrain.data.sources import ShardSequence, Source, StreamId
from vlmtrain.modeling.backbone import NativeViT
from vlmtrain.train.layout import latest_checkpoint
from vlmtrain.train.module import ranks_agree

pytestmark = pytest.mark.slow


def _agree(rank: int, port: int, outcome: Path) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ranks_agree([5, 70], torch.device("cpu"))
        ranks_agree([6, 70 if rank == 0 else 140], torch.device("cpu"))
        (outcome / f"{rank}").write_text("no error")
    except RuntimeError as error:
        (outcome / f"{rank}").write_text(str(error))
    finally:
        dist.destroy_process_group()


def test_every_rank_stops_when_ranks_disagree_on_the_budget(tmp_path):
    port = 29500 + os.getpid() % 1000
    torch.multiprocessing.start_processes(_agree, args=(port, tmp_path), nprocs=2, start_method="fork")
    for rank in (0, 1):
        assert (tmp_path / f"{rank}").read_text() == "ranks disagree on (step, budgets): [[6, 70], [6, 140]]"


@pytest.mark.parametrize("run", ["ddp_lora_run", "zero3_lora_run", "fsdp_lora_run"])
def test_steps_where_one_rank_has_only_text_complete_on_two_ranks(mixed_dir, run, request):
    run_dir, overrides = request.getfixturevalue(run)
    recipe = load_recipe(TINY, overrides)
    sources = [Source((f"{mixed_dir}/images-000000.tar", f"{mixed_dir}/texts-000000.tar"))]
    read = {rank: ShardSequence(sources, recipe.seed, StreamId(rank, 2, 0, 1), False).shard(0)[0] for rank in (0, 1)}
    assert {Path(url).name for url in read.values()} == {"images-000000.tar", "texts-000000.tar"}
    assert sorted(losses(run_dir)) == [0, 1, 2, 3]


def initial_lora(overrides: list[str]) -> dict[str, torch.Tensor]:
    """LoRA weights a run starts from (the module seeds itself before building the model)."""
    return {
        name: p.detach().clone() for name, p in built(load_recipe(TINY, overrides)).model.lm.named_parameters() if "lora_" in name
    }


def zero_consolidated(state: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The weights of a DeepSpeed checkpoint, consolidated by DeepSpeed's own tool."""
    return convert_zero_checkpoint_to_fp32_state_dict(state, tmp_path / "full.pt")["state_dict"]


def dcp_consolidated(state: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The weights of a sharded (torch.distributed.checkpoint) checkpoint, consolidated by torch's own tool."""
    dcp_to_torch_save(state, tmp_path / "full.pt")
    return torch.load(tmp_path / "full.pt", weights_only=False)["state_dict"]


def check_saved_adapter(run_dir: Path, overrides: list[str], tmp_path: Path, consolidate=zero_consolidated) -> None:
    """The run's adapter folder holds the whole trained adapter, equal to the strategy's own consolidation of
    its checkpoint and to what export reads, and it reloads onto a fresh base LM to the trained LM's logits."""
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    start = initial_lora(overrides)
    assert len(saved) == len(start) == 4
    for name, initial in start.items():
        key = name.replace(".default", "")
        assert saved[key].shape == initial.shape  # whole, not a ZeRO-3 shard
        assert not torch.equal(saved[key], initial), f"{name} did not train"

    # the consolidated checkpoint holds the same adapter, and only what trained
    consolidated = consolidate(latest_checkpoint(run_dir / "checkpoints") / "state", tmp_path)
    assert not any(name.startswith("model.lm.") and "lora_" not in name for name in consolidated)
    for name in start:
        torch.testing.assert_close(consolidated[f"model.lm.{name}"], saved[name.replace(".default", "")])
    # what export reads, gathered by vlmtrain itself, equals the strategy's own consolidation
    trained = load_file(latest_checkpoint(run_dir / "checkpoints") / "trained.safetensors")
    assert set(trained) == set(consolidated)
    for name, tensor in trained.items():
        torch.testing.assert_close(tensor, consolidated[name], rtol=0, atol=0)

    # a fresh base LM with the saved adapter gives the logits of the trained LM
    module = built(load_recipe(TINY, overrides))
    module.load_state_dict(consolidated, strict=False)
    base = built(load_recipe(TINY, [*overrides, "model.lm.lora.rank=0", "optim.lm.trainable=false"])).model.lm
    reloaded = PeftModel.from_pretrained(base, run_dir / "adapter")
    tokens = torch.randint(0, 250, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids=tokens).logits, module.model.lm.eval()(input_ids=tokens).logits)


def test_zero3_saves_the_gathered_trained_adapter_and_it_reloads(zero3_lora_run, tmp_path):
    check_saved_adapter(*zero3_lora_run, tmp_path)


def test_fsdp2_saves_the_gathered_trained_adapter_and_it_reloads(fsdp_lora_run, tmp_path):
    check_saved_adapter(*fsdp_lora_run, tmp_path, dcp_consolidated)


def test_fsdp2_trains_the_numbers_ddp_trains(fsdp_lora_run, ddp_lora_run):
    # the same steps on the same data: sharding changes where weights live, not what the model computes
    (fsdp_dir, _), (ddp_dir, _) = fsdp_lora_run, ddp_lora_run
    fsdp, ddp = losses(fsdp_dir), losses(ddp_dir)
    assert sorted(fsdp) == sorted(ddp) == [0, 1, 2, 3]
    for step in fsdp:
        assert fsdp[step] == pytest.approx(ddp[step], rel=1e-5, abs=1e-6)
    sharded = load_file(latest_checkpoint(fsdp_dir / "checkpoints") / "trained.safetensors")
    replicated = load_file(latest_checkpoint(ddp_dir / "checkpoints") / "trained.safetensors")
    assert set(sharded) == set(replicated)
    for name, tensor in sharded.items():
        torch.testing.assert_close(tensor, replicated[name], rtol=1e-4, atol=1e-5)


def test_compiled_layers_train_under_fsdp2_and_ddp_as_eager_layers_do(demo_dir, mixed_dir, tmp_path):
    # no dropout: compiled and eager kernels draw their random masks differently
    plain = ("model.lm.lora.dropout=0", "model.lm.hf_config.num_hidden_layers=2")
    for name, strategy in (("eager", ("trainer.strategy=ddp",)), ("ddp", ("trainer.strategy=ddp", "trainer.compile=true")),
                           ("fsdp", ("trainer.strategy=fsdp", "trainer.compile=true"))):
        two_process_run(demo_dir, mixed_dir, tmp_path / name, *strategy, *plain)
    eager, ddp, fsdp = (losses(tmp_path / name) for name in ("eager", "ddp", "fsdp"))
    assert sorted(eager) == sorted(ddp) == sorted(fsdp) == [0, 1, 2, 3]
    for step in range(4):
        assert ddp[step] == pytest.approx(eager[step], rel=1e-5, abs=1e-6)
        assert fsdp[step] == pytest.approx(eager[step], rel=1e-5, abs=1e-6)


def test_zero2_saves_the_gathered_trained_adapter_and_it_reloads(demo_dir, tmp_path):
    # with the user's own DeepSpeed JSON, as peers take one ("auto": the recipe's value)
    user_config = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 2e7}, "gradient_clipping": "auto"}
    (tmp_path / "ds.json").write_text(json.dumps(user_config))
    overrides = small_overrides(
        demo_dir,
        tmp_path / "run",
        *TWO_PROCESSES,
        "trainer.strategy=deepspeed",
        "trainer.deepspeed.stage=2",
        f"trainer.deepspeed.config={tmp_path / 'ds.json'}",
        *LORA,
        "optim.lm.lr=0.01",
    )
    run_cli(overrides)
    check_saved_adapter(tmp_path / "run", overrides, tmp_path)


@pytest.mark.parametrize(
    "strategy", [("trainer.strategy=deepspeed", "trainer.deepspeed.stage=3"), ("trainer.strategy=fsdp",)], ids=["zero3", "fsdp2"]
)
def test_sharded_resume_continues_with_the_losses_of_an_uninterrupted_run(demo_dir, tmp_path, strategy):
    common = (
        *TWO_PROCESSES,
        *strategy,
        *LORA,
        "data.num_workers=1",
        "trainer.checkpoint_every=3",
    )
    run_cli(small_overrides(demo_dir, tmp_path / "whole", *common, "trainer.max_steps=6"))
    run_cli(small_overrides(demo_dir, tmp_path / "cut", *common, "trainer.max_steps=3"))
    run_cli(small_overrides(demo_dir, tmp_path / "cut", *common, "trainer.max_steps=6", "resume=auto"))
    whole, cut = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert sorted(whole) == sorted(cut) == list(range(6))
    assert [cut[step] for step in range(6)] == [whole[step] for step in range(6)]


def test_sigkill_mid_run_then_resume_gives_the_losses_of_an_uninterrupted_run(demo_dir, tmp_path):
    # a constant learning rate: the killed run's max_steps (1000, so it is surely killed mid-way) changes nothing
    common = (
        *LORA,
        "data.num_workers=2",
        "data.val=null",
        "trainer.max_steps=12",
        "trainer.checkpoint_every=2",
        "optim.schedule=constant",
    )
    run_cli(small_overrides(demo_dir, tmp_path / "whole", *common))
    command = [
        sys.executable,
        "-m",
        "vlmtrain.cli",
        "fit",
        str(TINY),
        *small_overrides(demo_dir, tmp_path / "killed", *common, "trainer.max_steps=1000"),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 240
    while (
        latest_checkpoint(checkpoints) is None or latest_checkpoint(checkpoints).name < "step-000000006"
    ) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = int(latest_checkpoint(checkpoints).name[5:14])
    assert 6 <= killed_at < 12
    run_cli(small_overrides(demo_dir, tmp_path / "killed", *common, "resume=auto"))
    whole, resumed = losses(tmp_path / "whole"), losses(tmp_path / "killed")
    assert sorted(whole) == list(range(12))
    assert [resumed[step] for step in range(killed_at, 12)] == [whole[step] for step in range(killed_at, 12)]


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory) -> Path:
    """A tiny Llama with its tokenizer, and a tiny Gemma 4 vision tower inside a whole-VLM checkpoint."""
    from transformers import Gemma4VisionConfig, Gemma4VisionModel

    from vlmtrain.model.config import LMConfig
    from vlmtrain.model.lm import build_lm
    from vlmtrain.modeling.tokenizers import build_byte_tokenizer

    out = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(1)
    tokenizer = build_byte_tokenizer()
    build_lm(LMConfig(hf_config=TINY_LLAMA), tokenizer).save_pretrained(out / "llama")
    tokenizer.save_pretrained(out / "llama")
    tower = Gemma4VisionModel(Gemma4VisionConfig(**GEMMA4_TOWER))
    save_as_full_checkpoint(
        tower, out / "gemma4", "gemma4", "model.vision_tower.", {**GEMMA4_TOWER, "model_type": "gemma4_vision"}
    )
    save_file(
        NativeViT(patch_size=16, width=32, depth=1, heads=2).state_dict(), out / "native.safetensors"
    )  # small_overrides' ViT
    return out


VISION_FROM_FILES = {
    "gemma4": ("model.vision.backbone=gemma4", "model.vision.path={}/gemma4", "model.pooling.size=null"),
    "native": ("model.vision.path={}/native.safetensors",),
}


@pytest.mark.parametrize("vision", sorted(VISION_FROM_FILES))
def test_zero3_loads_local_pretrained_weights_exactly(demo_dir, pretrained_dir, tmp_path, vision):
    common = (
        *(override.format(pretrained_dir) for override in VISION_FROM_FILES[vision]),
        f"model.lm.path={pretrained_dir}/llama",
        "model.lm.hf_config=null",
        "optim.vision.trainable=false",
        "data.batching.lookahead=2",
        "data.batching.max_batch_size=2",
        "data.val=null",
        "trainer.max_steps=1",
        "budget.levels=[70]",
    )
    run_cli(
        small_overrides(
            demo_dir, tmp_path / "zero3", *common, *TWO_PROCESSES, "trainer.strategy=deepspeed", "trainer.deepspeed.stage=3"
        )
    )
    run_cli(small_overrides(demo_dir, tmp_path / "single", *common))
    zero3, single = losses(tmp_path / "zero3"), losses(tmp_path / "single")
    assert zero3.keys() == single.keys() == {0}
    assert zero3[0] == pytest.approx(single[0], rel=1e-5)


def test_torchrun_launch_takes_devices_and_nodes_from_its_environment(demo_dir, tmp_path):
    overrides = small_overrides(
        demo_dir, tmp_path / "run", "trainer.accelerator=cpu", "trainer.strategy=ddp", "data.val=null", "trainer.max_steps=3"
    )
    port = str(29600 + os.getpid() % 1000)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        f"--master-port={port}",
        "-m",
        "vlmtrain.cli",
        "fit",
        str(TINY),
        *overrides,
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run finished") == 1  # printed by rank 0 only
    assert (
        "distributed_backend=gloo" in result.stderr
        and "All distributed processes registered. Starting with 2 processes" in result.stderr
    )
    assert sorted(losses(tmp_path / "run")) == [0, 1, 2]


def test_zero3_with_lora_on_an_lm_lacking_the_image_token_saves_an_adapter_that_reloads(demo_dir, tmp_path):
    from vlmtrain.export.write import export
    from vlmtrain.inference import open_run
    from vlmtrain.model.config import LMConfig
    from vlmtrain.model.lm import build_lm
    from vlmtrain.modeling.tokenizers import build_byte_tokenizer

    tokenizer = build_byte_tokenizer(image_token="<img>")  # the base vocabulary lacks <image>
    build_lm(LMConfig(hf_config=TINY_LLAMA), tokenizer).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    overrides = small_overrides(
        demo_dir, tmp_path / "run", *TWO_PROCESSES, "trainer.strategy=deepspeed", "trainer.deepspeed.stage=3", *LORA,
        f"model.lm.path={tmp_path / 'llama'}", "model.lm.hf_config=null", "trainer.max_steps=2", "optim.lm.lr=0.01",
    )
    run_cli(overrides)
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert saved and all("lora_" in name for name in saved)  # not the embedding matrices the image token grew
    trained = open_run(tmp_path / "run")
    image_token = trained.tokenizer.convert_tokens_to_ids("<image>")
    base = build_lm(LMConfig(path=str(tmp_path / "llama")), trained.tokenizer)  # rebuilt in one process, no ZeRO-3
    reloaded = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    tokens = torch.tensor([[3, 40, image_token, 41, 7]])
    with torch.no_grad():
        expected = trained.model.lm(input_ids=tokens).logits
        torch.testing.assert_close(reloaded(input_ids=tokens).logits, expected)
    exported = export(tmp_path / "run", tmp_path / "export", keep_adapter=True)
    assert load_file(exported / "lm-adapter" / "adapter_model.safetensors").keys() == saved.keys()
