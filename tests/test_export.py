"""Export → load → generate: the exported model gives the training module's logits at every budget, loads
without Lightning or DeepSpeed, and its LM folder loads with transformers alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import IMAGES, TINY, small_overrides
from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
from safetensors.torch import load_file
from test_distributed import ENV, LORA, TWO_PROCESSES, run_cli

from vlmtrain.config import load_recipe
from vlmtrain.export import export, trained_model, vision_config
from vlmtrain.inference import ExportedModel
from vlmtrain.train.layout import latest_checkpoint
from vlmtrain.train.module import VLMModule

CASES = {"70": [70], "140": [140], "70+140": [70, 140]}  # the last: one budget per image
PROMPT = "Look <image> and <image>: "

LOAD_IN_A_FRESH_PROCESS = """
import json, sys
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
import vlmtrain

export_dir, out, images, prompt, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5])
model = vlmtrain.load(export_dir)
pictures = [Image.open(path) for path in images]
logits = {}
for name, budgets in cases.items():
    chosen = pictures[: len(budgets)] if len(budgets) > 1 else pictures[:1]
    text = prompt if len(chosen) > 1 else "<image> says: "
    logits[name] = model.logits(chosen, text, budget=budgets if len(budgets) > 1 else budgets[0])[0].contiguous()
save_file(logits, out)
generated = model.generate(pictures[:2], prompt, budget=[70, 140], max_new_tokens=5)
lm = AutoModelForCausalLM.from_pretrained(export_dir + "/lm")
tokenizer = AutoTokenizer.from_pretrained(export_dir + "/lm")
print(json.dumps({
    "generated": generated,
    "training_stack": sorted(m for m in ("lightning", "pytorch_lightning", "deepspeed") if m in sys.modules),
    "vocab": lm.get_input_embeddings().num_embeddings >= len(tokenizer) and "<image>" in tokenizer.get_vocab(),
}))
"""


def pictures() -> list[Path]:
    return [IMAGES / "chelsea.png", IMAGES / "logo2.png"]


def exported_logits(export_dir: Path, tmp_path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Load ``export_dir`` in a fresh Python process and return its logits per case and what it saw."""
    out = tmp_path / f"{export_dir.name}-logits.safetensors"
    result = subprocess.run(
        [sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, str(export_dir), str(out), json.dumps([str(p) for p in pictures()]), PROMPT, json.dumps(CASES)],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(out), json.loads(result.stdout.strip().splitlines()[-1])


def reference_logits(model, tokenizer, config) -> dict[str, torch.Tensor]:
    """The same cases through the trained model, in this process."""
    from PIL import Image

    reference = ExportedModel(model, tokenizer, config)
    images = [Image.open(path) for path in pictures()]
    logits = {}
    for name, budgets in CASES.items():
        if len(budgets) > 1:
            logits[name] = reference.logits(images[: len(budgets)], PROMPT, budget=budgets)[0]
        else:
            logits[name] = reference.logits(images[:1], "<image> says: ", budget=budgets[0])[0]
    return logits


def check_export(export_dir: Path, expected: dict[str, torch.Tensor], tmp_path: Path) -> None:
    found, seen = exported_logits(export_dir, tmp_path)
    assert seen["training_stack"] == [] and seen["vocab"] and isinstance(seen["generated"], str)
    for name in CASES:
        torch.testing.assert_close(found[name], expected[name], atol=1e-5, rtol=1e-5)


def test_export_of_a_ddp_run_gives_the_training_logits_at_every_budget(demo_dir, tmp_path):
    run_cli(small_overrides(demo_dir, tmp_path / "run", *TWO_PROCESSES, "trainer.strategy=ddp", *LORA, "optim.lm.lr=0.01"))
    model, tokenizer, recipe, _ = trained_model(tmp_path / "run")
    expected = reference_logits(model, tokenizer, vision_config(model, recipe))
    out = export(tmp_path / "run", tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "lm", "recipe.yaml", "vision"]
    check_export(out, expected, tmp_path)
    assert "# " + recipe.name in (out / "README.md").read_text()


def test_export_of_a_zero3_lora_run_matches_deepspeeds_own_consolidation(demo_dir, tmp_path):
    overrides = small_overrides(demo_dir, tmp_path / "run", *TWO_PROCESSES, "trainer.strategy=deepspeed", "trainer.deepspeed.stage=3", *LORA, "optim.lm.lr=0.01")
    run_cli(overrides)
    state = latest_checkpoint(tmp_path / "run" / "checkpoints") / "state"
    consolidated = convert_zero_checkpoint_to_fp32_state_dict(state, tmp_path / "consolidated.pt")["state_dict"]
    module = VLMModule(load_recipe(TINY, overrides))
    module.configure_model()
    module.load_state_dict(consolidated, strict=False)
    expected = reference_logits(module.model.eval(), module.tokenizer, vision_config(module.model, module.recipe))
    check_export(export(tmp_path / "run", tmp_path / "merged"), expected, tmp_path)
    check_export(export(tmp_path / "run", tmp_path / "adapter", keep_adapter=True), expected, tmp_path)
    assert (tmp_path / "adapter" / "lm-adapter" / "adapter_model.safetensors").is_file()


def test_export_refuses_what_is_not_a_run_and_an_existing_folder(demo_dir, tmp_path):
    from vlmtrain.errors import UserError

    with pytest.raises(UserError, match="neither a run directory"):
        export(tmp_path, tmp_path / "out")
    with pytest.raises(UserError, match="no complete checkpoint"):
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "recipe.yaml").write_text("name: x\n")
        export(tmp_path / "run", tmp_path / "out")
