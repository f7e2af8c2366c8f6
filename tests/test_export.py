"""Export → load → generate: the exported model gives the training model's logits at every budget, for every
backbone kind and both poolings; it loads without Lightning or DeepSpeed; an edited or damaged export is
refused with one line naming the file and key."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    DINOV2_TOWER,
    ENV,
    GEMMA4_IMAGE_TOKENS,
    GEMMA4_TOWER,
    IMAGES,
    LORA,
    QWEN25_TOWER,
    SIGLIP2_TOWER,
    TINY,
    TINY_GEMMA4_TEXT,
    TINY_LLAMA,
    built,
    gemma4_tokenizer,
    in_use,
    run_cli,
    small_overrides,
    small_recipe,
)
from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
from transformers.video_utils import VideoMetadata, default_sample_indices_fn

from vlmtrain.config import load_recipe, recipe_from_configs
from vlmtrain.errors import UserError
from vlmtrain.export.write import export, write_export
from vlmtrain.inference import ExportedModel, load, open_run
from vlmtrain.model.config import LMConfig
from vlmtrain.model.lm import build_lm
from vlmtrain.modeling.tokenizers import build_byte_tokenizer
from vlmtrain.plan import plan_run
from vlmtrain.train.layout import latest_checkpoint

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
        [
            sys.executable,
            "-c",
            LOAD_IN_A_FRESH_PROCESS,
            str(export_dir),
            str(out),
            json.dumps([str(p) for p in pictures()]),
            PROMPT,
            json.dumps(CASES),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(out), json.loads(result.stdout.strip().splitlines()[-1])


def reference_logits(reference: ExportedModel) -> dict[str, torch.Tensor]:
    """The same cases through the trained model, in this process."""
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


@pytest.mark.slow
def test_export_of_a_ddp_run_gives_the_training_logits_at_every_budget(ddp_lora_run, tmp_path):
    run_dir, _ = ddp_lora_run
    expected = reference_logits(open_run(run_dir))
    out = export(run_dir, tmp_path / "export")
    written = {p.name for p in out.iterdir()}
    assert {"README.md", "lm", "recipe.yaml", "vision", "config.json", "model.safetensors.index.json"} <= written
    check_export(out, expected, tmp_path)
    assert "# " + load_recipe(run_dir / "recipe.yaml").name in (out / "README.md").read_text()


@pytest.mark.slow
def test_export_of_a_zero3_lora_run_matches_deepspeeds_own_consolidation(zero3_lora_run, tmp_path):
    run_dir, overrides = zero3_lora_run
    state = latest_checkpoint(run_dir / "checkpoints") / "state"
    consolidated = convert_zero_checkpoint_to_fp32_state_dict(state, tmp_path / "consolidated.pt")["state_dict"]
    module = built(load_recipe(TINY, overrides))
    module.load_state_dict(consolidated, strict=False)
    expected = reference_logits(in_use(module))
    check_export(export(run_dir, tmp_path / "merged"), expected, tmp_path)
    check_export(export(run_dir, tmp_path / "adapter", keep_adapter=True), expected, tmp_path)
    assert (tmp_path / "adapter" / "lm-adapter" / "adapter_model.safetensors").is_file()


BACKBONES = {  # the small recipe's native ViT, or a tiny HF tower with random weights
    "native": (),
    "siglip2": (
        "model.vision.backbone=siglip2",
        f"model.vision.hf_config={json.dumps(SIGLIP2_TOWER)}",
        "model.vision.patch_size=null",
    ),
    "gemma4": (
        "model.vision.backbone=gemma4",
        f"model.vision.hf_config={json.dumps(GEMMA4_TOWER)}",
        "model.vision.patch_size=null",
        "model.pooling.size=null",
    ),
    "dinov2": (
        "model.vision.backbone=dinov2",
        f"model.vision.hf_config={json.dumps(DINOV2_TOWER)}",
        "model.vision.patch_size=null",
    ),
}


QWEN25_PARTS = (  # Qwen2.5-VL's tower, its patch merger pooling and projecting to the LM's width itself
    "model.vision.backbone=qwen2_5_vl", f"model.vision.hf_config={json.dumps(QWEN25_TOWER)}", "model.vision.patch_size=null",
    "model.pooling.kind=tower", "model.pooling.size=null", "model.projector.kind=identity",
)


def untrained_export(demo_dir: Path, tmp_path: Path, *overrides: str) -> tuple[ExportedModel, Path]:
    """A model of the small recipe with random weights everywhere (pooling and projector included), and its export."""
    recipe = small_recipe(demo_dir, tmp_path / "run", *overrides)
    module = built(recipe)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in module.model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model = in_use(module)
    write_export(model, recipe, tmp_path / "export")
    return model, tmp_path / "export"


def test_the_exported_processor_takes_videos_as_frames_and_gives_the_training_ids_and_logits(demo_dir, tmp_path):
    """The export's own processor (remote code) given a ``<video>`` prompt and the video's frames: the frames the
    family samples (2 a second, 3 of 5 spread as transformers' default sampler spreads them; fewer at a budget
    whose frames would pass data.video.max_tokens), each after its ``mm:ss`` time at the video budget (or the one
    asked; a key frame at its own), as vlmtrain.load writes the same conversation; the export's model gives its
    logits."""
    from PIL import ImageOps

    from vlmtrain.text.chat import generation_prompt

    model, out = untrained_export(demo_dir, tmp_path, "data.video.max_frames=3", "data.video.max_tokens=210",
                                  "data.text.max_length=512")
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    served = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
    picture = Image.open(pictures()[0]).convert("RGB").resize((96, 64))
    frames = [picture, ImageOps.mirror(picture), ImageOps.invert(picture), ImageOps.flip(picture), picture.rotate(90)]
    question = [{"role": "user", "content": "<video>What changes?"}]
    reference = load(out)
    text = generation_prompt(processor.tokenizer, question)
    for budget in (None, 140):
        inputs = processor(text, videos=[frames], video_budget=budget)
        part = {"type": "video"} if budget is None else {"type": "video", "budget": budget}
        asked = [{"role": "user", "content": [part, {"type": "text", "text": "What changes?"}]}]
        ids, images = reference.inputs([], messages=asked, videos=[frames])
        assert inputs["input_ids"].tolist() == ids.tolist()
        tokens = model.geometry.image(64, 96, budget or 70).tokens
        block = "<image>" * tokens
        if budget is None:  # 3 frames (210 // 70)
            assert images.token_counts.tolist() == [tokens] * 3
            assert f"00:00 {block} 00:00 {block} 00:01 {block}What changes?" in processor.decode(inputs["input_ids"][0])
        else:  # 1 frame (210 // 140)
            assert images.token_counts.tolist() == [tokens]
            assert f"00:00 {block}What changes?" in processor.decode(inputs["input_ids"][0])
        with torch.no_grad():
            logits = served(**inputs).logits
        torch.testing.assert_close(logits, reference.logits([], messages=asked, videos=[frames]), atol=1e-5, rtol=1e-5)

    # a key frame at 1 s (frame 2, in place of frame 1, the sampled frame nearest it) at a budget of its own
    key = [{"time": 1.0, "budget": 140}]
    inputs = processor(text, videos=[frames], key_frames=[key])
    asked = [{"role": "user", "content": [{"type": "video", "key_frames": key}, {"type": "text", "text": "What changes?"}]}]
    ids, images = reference.inputs([], messages=asked, videos=[frames])
    assert inputs["input_ids"].tolist() == ids.tolist()
    small, large = (model.geometry.image(64, 96, budget).tokens for budget in (70, 140))
    assert images.token_counts.tolist() == [small, large, small]
    stamps = f"00:00 {'<image>' * small} 00:01 {'<image>' * large} 00:01 {'<image>' * small}What changes?"  # 0, 1, 1.5 s
    assert stamps in processor.decode(inputs["input_ids"][0])
    with torch.no_grad():
        logits = served(**inputs).logits
    torch.testing.assert_close(logits, reference.logits([], messages=asked, videos=[frames]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "backbone, pooling, projector",
    [(backbone, pooling, "mlp") for backbone in sorted(BACKBONES) for pooling in ("average", "attention")]
    + [("gemma4", "average", "gemma4")],  # Gemma 4's tower, pooling and embedder
)
def test_every_backbone_and_pooling_exports_and_loads_to_the_same_logits_at_every_budget(
    demo_dir, tmp_path, backbone, pooling, projector
):
    model, out = untrained_export(
        demo_dir,
        tmp_path,
        *BACKBONES[backbone],
        f"model.pooling.kind={pooling}",
        "model.pooling.heads=2",
        f"model.projector.kind={projector}",
    )
    loaded = load(out)
    assert type(loaded.model.backbone) is type(model.model.backbone) and type(loaded.model.pooling) is type(model.model.pooling)
    images = [Image.open(path) for path in pictures()]
    for budget in model.geometry.levels:
        torch.testing.assert_close(
            loaded.logits(images, PROMPT, budget=budget), model.logits(images, PROMPT, budget=budget), atol=1e-5, rtol=1e-5
        )
    torch.testing.assert_close(
        loaded.logits(images, PROMPT, budget=[140, 70]), model.logits(images, PROMPT, budget=[140, 70]), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("variant", ["model.lm.lora.dora=true", "model.lm.lora.rslora=true"])
def test_dora_and_rslora_adapters_export_merged_with_the_training_logits(demo_dir, tmp_path, variant):
    # every weight perturbed, the adapters' (DoRA's magnitudes included) too: the merge must carry all of them
    model, out = untrained_export(demo_dir, tmp_path, *LORA, variant)
    names = [name for name, _ in model.model.lm.named_parameters()]
    assert any("lora_magnitude_vector" in name for name in names) == (variant.endswith("dora=true"))
    images = [Image.open(path) for path in pictures()]
    for budget in (70, 140):
        torch.testing.assert_close(load(out).logits(images, PROMPT, budget), model.logits(images, PROMPT, budget),
                                   atol=1e-5, rtol=1e-5)
    if variant.endswith("dora=true"):
        recipe = small_recipe(demo_dir, tmp_path / "run", *LORA, variant)
        with pytest.raises(UserError, match=r"^--keep-adapter: a DoRA adapter cannot be merged at loading without PEFT"):
            write_export(model, recipe, tmp_path / "kept", keep_adapter=True)


def test_lora_on_the_vision_encoder_and_projector_trains_only_adapters_and_exports_merged_with_the_training_logits(
    demo_dir, tmp_path
):
    from vlmtrain.train.optim import set_trainable

    vision_lora = ("model.vision.lora.rank=4", "model.vision.lora.target_modules=[qkv,proj]", "model.projector.lora.rank=2",
                   "model.projector.lora.target_modules=[mlp.0,mlp.2]")
    model, out = untrained_export(demo_dir, tmp_path, *vision_lora, *LORA)
    recipe = small_recipe(demo_dir, tmp_path / "run", *vision_lora, *LORA)
    set_trainable(model.model, recipe.optim)
    trained = {name.split(".")[0] for name, parameter in model.model.named_parameters() if parameter.requires_grad}
    adapted = {name.split(".")[0] for name, parameter in model.model.named_parameters() if "lora_" in name}
    parts = [*model.model.backbone.named_parameters(), *model.model.projector.named_parameters()]
    frozen = [name for name, parameter in parts if "lora_" not in name and parameter.requires_grad]
    assert adapted == {"backbone", "projector", "lm"} and not frozen
    assert trained == {"backbone", "projector", "lm"}  # average pooling has no weights
    loaded = load(out)
    assert not any("lora_" in name for name, _ in loaded.model.named_parameters())  # merged: a plain tower
    images = [Image.open(path) for path in pictures()]
    for budget in (70, 140):
        torch.testing.assert_close(loaded.logits(images, PROMPT, budget), model.logits(images, PROMPT, budget),
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match=r"^model.vision.lora: Target modules \{'q_proj'\} not found"):
        built(small_recipe(demo_dir, tmp_path / "other", "model.vision.lora.rank=4", "model.vision.lora.target_modules=[q_proj]"))


def test_an_lm_converted_from_gguf_exports_and_loads_with_its_lora_adapter_merged_or_kept(demo_dir, tmp_path):
    # scripts/convert_pretrained.py once left the GGUF file's quantization_config in the converted config
    # (the weights are plain); export then failed in save_pretrained ("quantized with gguf, not serializable").
    # Its vocabulary lacks the image token: export and load add the same rows for it.
    tokenizer = build_byte_tokenizer(image_token="<img>")
    build_lm(LMConfig(hf_config=TINY_LLAMA), tokenizer).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    config_file = tmp_path / "llama" / "config.json"
    gguf = {"quant_method": "gguf", "gguf_file": "model.Q4_1.gguf", "dequantize": False}
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "quantization_config": gguf}))
    lm = (f"model.lm.path={tmp_path / 'llama'}", "model.lm.hf_config=null", *LORA)
    model, out = untrained_export(demo_dir, tmp_path, *lm)
    assert "quantization_config" not in json.loads((out / "lm" / "config.json").read_text())
    images = [Image.open(path) for path in pictures()]
    torch.testing.assert_close(load(out).logits(images, PROMPT, budget=70), model.logits(images, PROMPT, budget=70))
    # exporting left the trained model as it was: exported again, with the adapter kept apart
    write_export(model, small_recipe(demo_dir, tmp_path / "run", *lm), tmp_path / "with-adapter", keep_adapter=True)
    saved = load_file(tmp_path / "with-adapter" / "lm-adapter" / "adapter_model.safetensors")
    assert saved and all("lora_" in name for name in saved)  # not the embedding matrices the image token grew
    adapter = load(tmp_path / "with-adapter")
    torch.testing.assert_close(adapter.logits(images, PROMPT, budget=70), model.logits(images, PROMPT, budget=70))


TRANSFORMERS_ALONE = """
import json, sys

class NoVlmtrain:  # the exported folder must serve without vlmtrain installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "vlmtrain":
            raise ImportError("vlmtrain is not importable here")

sys.meta_path.insert(0, NoVlmtrain())
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

exports, out, images, prompt, budgets = sys.argv[1:]
exports, images, budgets = json.loads(exports), json.loads(images), json.loads(budgets)
pictures = [Image.open(path) for path in images]
logits, generated = {}, {}
for name, folder in exports.items():
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        for budget in budgets:
            logits[f"{name}/{budget}"] = model(**processor(prompt, pictures, budget=budget)).logits[0].contiguous()
    inputs = processor(prompt, pictures, budget=budgets[-1])
    tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    generated[name] = processor.decode(tokens, skip_special_tokens=True)
save_file(logits, out)
print(json.dumps({"generated": generated, "vlmtrain": sorted(m for m in sys.modules if m.split(".")[0] == "vlmtrain")}))
"""


def transformers_outputs(exports: dict[str, Path], budgets: list, tmp_path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Logits per (export, budget) and the greedy generations at the last budget, from transformers alone
    (``AutoModelForImageTextToText`` and ``AutoProcessor`` with the exports' own code) in a fresh process."""
    out = tmp_path / "transformers-logits.safetensors"
    arguments = [json.dumps({name: str(path) for name, path in exports.items()}), str(out)]
    arguments += [json.dumps([str(p) for p in pictures()]), PROMPT, json.dumps(budgets)]
    env = {**ENV, "HF_MODULES_CACHE": str(tmp_path / "hf-modules")}
    result = subprocess.run(
        [sys.executable, "-c", TRANSFORMERS_ALONE, *arguments], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(out), json.loads(result.stdout.strip().splitlines()[-1])


def check_transformers_model(exports: dict[str, Path], tmp_path: Path) -> None:
    """Each export, loaded by transformers alone, gives vlmtrain.load's logits at every budget (and one per
    image) and its greedy generation."""
    budgets = [70, 140, [140, 70]]
    logits, seen = transformers_outputs(exports, budgets, tmp_path)
    assert seen["vlmtrain"] == []
    images = [Image.open(path) for path in pictures()]
    for name, folder in exports.items():
        reference = load(folder)
        for budget in budgets:
            expected = reference.logits(images, PROMPT, budget=budget)[0]
            torch.testing.assert_close(logits[f"{name}/{budget}"], expected, atol=1e-5, rtol=1e-5)
        assert seen["generated"][name] == reference.generate(images, PROMPT, budget=budgets[-1], max_new_tokens=6), name


@pytest.mark.slow
def test_every_backbone_and_pooling_loads_as_one_transformers_model_with_the_same_outputs(demo_dir, tmp_path):
    exports = {}
    for backbone in sorted(BACKBONES):
        for pooling in ("average", "attention"):
            folder = tmp_path / f"{backbone}-{pooling}"
            overrides = (*BACKBONES[backbone], f"model.pooling.kind={pooling}", "model.pooling.heads=2")
            exports[folder.name] = untrained_export(demo_dir, folder, *overrides)[1]
    gemma4_parts = (*BACKBONES["gemma4"], "model.projector.kind=gemma4")  # Gemma 4's tower, pooling and embedder
    exports["gemma4-embedder"] = untrained_export(demo_dir, tmp_path / "gemma4-embedder", *gemma4_parts)[1]
    exports["qwen2_5_vl"] = untrained_export(demo_dir, tmp_path / "qwen2_5_vl", *QWEN25_PARTS)[1]  # pools itself
    lora, _ = untrained_export(demo_dir, tmp_path / "lora", *LORA)  # the adapter kept apart, merged at loading
    write_export(lora, small_recipe(demo_dir, tmp_path / "lora" / "run", *LORA), tmp_path / "lora-kept", keep_adapter=True)
    exports["lora-kept"] = tmp_path / "lora-kept"
    check_transformers_model(exports, tmp_path)
    assert json.loads((tmp_path / "lora-kept" / "config.json").read_text())["adapter"] == "lm-adapter"


@pytest.fixture(scope="module")
def native_export(demo_dir, tmp_path_factory) -> Path:
    return untrained_export(demo_dir, tmp_path_factory.mktemp("native"))[1]


def edited(export_dir: Path, tmp_path: Path, edit) -> Path:
    """A copy of ``export_dir`` with ``edit`` applied to its vision/config.json values."""
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(export_dir, copy)
    config_file = copy / "vision" / "config.json"
    config = json.loads(config_file.read_text())
    edit(config)
    config_file.write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda c: c["model"]["pooling"].update(size=3), "model.pooling.size is 3, but the weights were exported with 1"),
        (
            lambda c: c["model"]["vision"]["settings"].update(width=64),
            "model.vision.settings.width is 64, but the weights were exported with 32",
        ),
        (lambda c: c["model"].update(levels=[70, 140, 280]), "model.levels"),
        (lambda c: c["model"]["vision"].update(kind="dinov2"), "model.vision.kind is 'dinov2'"),
    ],
)
def test_a_config_edited_after_export_is_refused_naming_the_key(native_export, tmp_path, edit, key):
    with pytest.raises(UserError) as caught:
        load(edited(native_export, tmp_path, edit))
    assert key in str(caught.value) and "\n" not in str(caught.value) and "edited after export" in str(caught.value)


def cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def nudged(path: Path) -> None:
    """The file as another export of the same shapes would have it: one value changed, metadata kept."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}
    first = sorted(tensors)[0]
    tensors[first].view(-1)[0] += 1.0
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda folder: (folder / "vision" / "config.json").unlink(), "vision/config.json: missing"),
        (lambda folder: (folder / "vision" / "config.json").write_text("{not json"), "vision/config.json: not valid JSON"),
        (lambda folder: (folder / "vision" / "model.safetensors").unlink(), "vision/model.safetensors: missing"),
        (lambda folder: __import__("shutil").rmtree(folder / "lm"), "/lm/model.safetensors: missing"),
        (lambda folder: cut_short(folder / "vision" / "model.safetensors"),
         "vision/model.safetensors: not a readable safetensors file \\(.*\\)$"),
        (lambda folder: cut_short(folder / "lm" / "model.safetensors"), "lm/model.safetensors: not a readable safetensors file"),
        (lambda folder: nudged(folder / "lm" / "model.safetensors"),
         "lm/model.safetensors: not the weights this export wrote \\(another export's, or changed since\\); export again$"),
        (lambda folder: nudged(folder / "vision" / "model.safetensors"), "vision/model.safetensors: not the weights this export"),
        (lambda folder: __import__("torch").save({}, folder / "lm" / "pytorch_model.bin"),
         "lm/pytorch_model.bin: a pickle file in an export; vlmtrain reads safetensors only"),
    ],
)
def test_a_damaged_export_is_one_line_naming_the_file(native_export, tmp_path, damage, message):
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(native_export, copy)
    damage(copy)
    with pytest.raises(UserError, match=message):
        load(copy)


def test_an_export_of_the_previous_format_loads_without_fingerprints(native_export, tmp_path):
    older = edited(native_export, tmp_path, lambda c: [c.update(format="vlmtrain-model/4"), c.pop("weights")])
    nudged(older / "lm" / "model.safetensors")  # nothing to tell it by: /4 exports recorded no fingerprints
    assert load(older).description == load(native_export).description


def test_a_config_missing_a_key_or_with_an_unknown_one_is_refused(native_export, tmp_path):
    with pytest.raises(UserError, match=r"config.json: model.pooling.heads: missing"):
        load(edited(native_export, tmp_path / "a", lambda c: c["model"]["pooling"].pop("heads")))
    with pytest.raises(UserError, match=r"model.pooling.sise: unknown key; did you mean 'size'"):
        load(edited(native_export, tmp_path / "b", lambda c: c["model"]["pooling"].update(sise=1)))


def test_export_refuses_what_is_not_a_run_and_an_existing_folder(demo_dir, tmp_path):
    with pytest.raises(UserError, match="neither a run directory"):
        export(tmp_path, tmp_path / "out")
    with pytest.raises(UserError, match="no complete checkpoint"):
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "recipe.yaml").write_text("name: x\n")
        export(tmp_path / "run", tmp_path / "out")
    with pytest.raises(UserError, match="already exists"):
        export(tmp_path / "run", tmp_path)


GEMMA4_SHAPED = (  # Gemma 4's tower, its own 3x3 average pooling, Gemma 4's embedder, a Gemma 4 text LM
    *BACKBONES["gemma4"],
    "model.projector.kind=gemma4",
    f"model.lm.hf_config={json.dumps(TINY_GEMMA4_TEXT)}",
    f"model.lm.image_token={GEMMA4_IMAGE_TOKENS['image_token']}",
    f"data.text.prompt='{GEMMA4_IMAGE_TOKENS['image_token']}'",
)


def at_budget(image: Image.Image, geometry, budget: int) -> Image.Image:
    """``image`` resized beforehand to a size the budget keeps as it is, so that neither processor resamples
    it (vlmtrain's and Gemma 4's resampling differ by up to a grey level)."""
    size = (image.height, image.width)
    for _ in range(8):
        if geometry.image(*size, budget).resize == size:
            return image.convert("RGB").resize(size[::-1], Image.BICUBIC)
        size = geometry.image(*size, budget).resize
    raise AssertionError(f"no size that budget {budget} keeps near {image.size}")


@pytest.fixture(scope="module")
def gemma4_export(demo_dir, tmp_path_factory) -> tuple[ExportedModel, Path]:
    """A Gemma 4-shaped model with random weights, and its export."""
    folder = tmp_path_factory.mktemp("gemma4")
    tokenizer = gemma4_tokenizer(folder / "tokenizer")
    return untrained_export(demo_dir, folder, *GEMMA4_SHAPED, f"model.lm.tokenizer={tokenizer}")


@pytest.mark.slow
def test_a_gemma4_shaped_model_exports_as_native_gemma4_with_the_training_logits_at_every_budget(gemma4_export):
    from transformers import Gemma4ForConditionalGeneration

    model, out = gemma4_export
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma4" and "auto_map" not in config and not list(out.glob("*.py"))
    assert not (out / "lm").exists() and not (out / "vision" / "model.safetensors").exists()  # each weight once
    native, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert type(native) is Gemma4ForConditionalGeneration
    assert not any(info.values()), info  # every weight found, none left over
    native.eval()
    tokenizer, image_processor = AutoTokenizer.from_pretrained(out), AutoImageProcessor.from_pretrained(out)
    boi, image, eoi = (GEMMA4_IMAGE_TOKENS[name] for name in ("boi_token", "image_token", "eoi_token"))
    loaded = load(out)
    for budget in model.geometry.levels:
        for count in (1, 2):
            pictures_at_budget = []
            for path in pictures()[:count]:
                picture = at_budget(Image.open(path), model.geometry, budget)
                pictures_at_budget.append((picture, model.geometry.image(picture.height, picture.width, budget).tokens))
            images = [picture for picture, _ in pictures_at_budget]
            # Gemma 4's layout, written out: each image is <|image> + its soft tokens + <image|>
            text = "<bos>Look " + "".join(f"{boi}{image * tokens}{eoi}" for _, tokens in pictures_at_budget) + " and say: "
            input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            prompt = f"Look {image} and say: " if count == 1 else f"Look {image}{image} and say: "
            assert torch.equal(model.inputs(images, prompt, budget=budget)[0], input_ids)
            pixels = image_processor(images, max_soft_tokens=budget, return_tensors="pt")
            with torch.no_grad():
                served = native(
                    input_ids=input_ids, pixel_values=pixels["pixel_values"], image_position_ids=pixels["image_position_ids"]
                ).logits
            trained = model.logits(images, prompt, budget=budget)
            torch.testing.assert_close(served, trained, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(loaded.logits(images, prompt, budget=budget), trained, atol=1e-5, rtol=1e-5)
    generated = native.generate(
        input_ids=input_ids, pixel_values=pixels["pixel_values"], image_position_ids=pixels["image_position_ids"],
        max_new_tokens=6, do_sample=False,
    )[0, input_ids.shape[1] :]
    expected = model.generate(images, prompt, budget=budget, max_new_tokens=6)
    assert tokenizer.decode(generated, skip_special_tokens=True) == expected


def native_processor(folder: Path):
    """The folder's Gemma4Processor: AutoProcessor where torchvision is installed; without it (transformers
    cannot build Gemma 4's video processor) from the image processor, feature extractor and tokenizer the
    folder holds, with no video processor."""
    from unittest import mock

    from transformers import AutoFeatureExtractor, AutoProcessor, Gemma4Processor, ProcessorMixin

    if importlib.util.find_spec("torchvision") is not None:
        return AutoProcessor.from_pretrained(folder)
    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, argument: None):
        return Gemma4Processor(
            feature_extractor=AutoFeatureExtractor.from_pretrained(folder),
            image_processor=AutoImageProcessor.from_pretrained(folder),
            tokenizer=AutoTokenizer.from_pretrained(folder),
            video_processor=None,
        )


@pytest.mark.slow
def test_the_native_gemma4_processor_encodes_as_training_did(gemma4_export):
    model, out = gemma4_export
    processor = native_processor(out)
    image = GEMMA4_IMAGE_TOKENS["image_token"]
    for budget in model.geometry.levels:
        images = [at_budget(Image.open(path), model.geometry, budget) for path in pictures()]
        for prompt in (f"<bos>Look {image} and say: ", f"<bos>Look {image}{image} and say: "):
            chosen = images[: prompt.count(image)]
            served = processor(text=prompt, images=chosen, images_kwargs={"max_soft_tokens": budget}, return_tensors="pt")
            assert torch.equal(served["input_ids"], model.inputs(chosen, prompt, budget=budget)[0])
            with torch.no_grad():
                logits = AutoModelForImageTextToText.from_pretrained(out).eval()(**served).logits
            torch.testing.assert_close(logits, model.logits(chosen, prompt, budget=budget), atol=1e-5, rtol=1e-5)
    # what no call above reads: the processor's default budget, and the config's image token ids
    default = model.description.default_budget
    assert default != 280  # Gemma4ImageProcessor's own default: a folder that forgot the model's would pass
    chosen = [at_budget(Image.open(pictures()[0]), model.geometry, default)]
    served = processor(text=f"<bos>Look {image} and say: ", images=chosen, return_tensors="pt")  # no budget given
    assert torch.equal(served["input_ids"], model.inputs(chosen, f"<bos>Look {image} and say: ")[0])
    assert json.loads((out / "processor_config.json").read_text())["image_seq_length"] == default
    config, tokenizer = json.loads((out / "config.json").read_text()), AutoTokenizer.from_pretrained(out)
    assert config["vision_config"]["default_output_length"] == default  # vLLM's default budget: it will not start without
    assert {f"{name}_id": config[f"{name}_id"] for name in GEMMA4_IMAGE_TOKENS} == {
        f"{name}_id": tokenizer.convert_tokens_to_ids(token) for name, token in GEMMA4_IMAGE_TOKENS.items()
    }


def test_a_gemma4_tower_with_another_projector_is_exported_with_remote_code_saying_why(demo_dir, tmp_path):
    recipe = small_recipe(demo_dir, tmp_path / "run", *BACKBONES["gemma4"])
    module = built(recipe)
    model = in_use(module)
    line = write_export(model, recipe, tmp_path / "export")
    assert line.endswith("not native Gemma 4: model.projector.kind is mlp, not gemma4")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == "vlmtrain"


def test_an_lm_with_per_layer_inputs_is_refused_in_one_line():
    # Gemma 4 E2B/E4B look per-layer embeddings up by token id; image positions have none
    with pytest.raises(UserError, match=r"hidden_size_per_layer_input=8, e\.g\. Gemma 4 E2B/E4B"):
        build_lm(LMConfig(hf_config={**TINY_GEMMA4_TEXT, "hidden_size_per_layer_input": 8}), build_byte_tokenizer())


@pytest.mark.slow
def test_a_recipe_starting_from_a_whole_gemma4_checkpoint_computes_what_gemma4_does(demo_dir, tmp_path):
    # a Gemma 4 release is one checkpoint: the recipe reads its tower, its embedder and its text model from it
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    folder = gemma4_tokenizer(tmp_path / "gemma4")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    special = {name: getattr(tokenizer, name) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}
    torch.manual_seed(0)
    reference = Gemma4ForConditionalGeneration(
        Gemma4Config(
            text_config={**TINY_GEMMA4_TEXT, "vocab_size": len(tokenizer), **special},
            vision_config={**GEMMA4_TOWER, "model_type": "gemma4_vision"},
            audio_config=None,
            **{f"{name}_id": tokenizer.convert_tokens_to_ids(token) for name, token in GEMMA4_IMAGE_TOKENS.items()},
        )
    ).eval()
    with torch.no_grad():
        for parameter in reference.parameters():  # away from the initial ones (norms of ones, zero biases)
            parameter.add_(torch.randn_like(parameter) * 0.05)
    reference.save_pretrained(folder)
    recipe = small_recipe(
        demo_dir,
        tmp_path / "run",
        "model.vision.backbone=gemma4",
        f"model.vision.path={folder}",
        "model.vision.patch_size=null",
        "model.pooling.size=null",
        "model.projector.kind=gemma4",
        f"model.lm.path={folder}",
        "model.lm.hf_config=null",
        f"model.lm.image_token={GEMMA4_IMAGE_TOKENS['image_token']}",
        GEMMA4_SHAPED[-1],  # the prompt with Gemma 4's image token
    )
    module = built(recipe)
    model = in_use(module)
    prompt = f"Look {GEMMA4_IMAGE_TOKENS['image_token']} and say: "
    for budget in model.geometry.levels:
        image = at_budget(Image.open(pictures()[0]), model.geometry, budget)
        input_ids, _ = model.inputs([image], prompt, budget=budget)
        pixels = Gemma4ImageProcessorPil(max_soft_tokens=budget)([image], return_tensors="pt")
        with torch.no_grad():
            expected = reference(
                input_ids=input_ids, pixel_values=pixels["pixel_values"], image_position_ids=pixels["image_position_ids"]
            ).logits
        torch.testing.assert_close(model.logits([image], prompt, budget=budget), expected, atol=1e-5, rtol=1e-5)
    # the same recipe said in one key: the checkpoint's family fills in every part
    short = recipe_from_configs([OmegaConf.create({"model": {"checkpoint": str(folder)}, "data": {"train": recipe.data.train}})])
    assert plan_run(short).model.lm == module.plan.model.lm
    assert (short.model.vision.backbone, short.model.pooling, short.model.projector.kind) == (
        "gemma4", recipe.model.pooling, "gemma4"
    )


@pytest.mark.slow
def test_a_gemma4_shaped_run_trains_packed_and_vlmtrain_export_writes_native_gemma4(demo_dir, tmp_path):
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    tokenizer = gemma4_tokenizer(tmp_path / "tokenizer")
    run_dir = tmp_path / "run"
    overrides = small_overrides(demo_dir, run_dir, *GEMMA4_SHAPED, f"model.lm.tokenizer={tokenizer}", "trainer.max_steps=2")
    run_cli([*overrides, "data.val=null"])  # packed rows, vlmtrain_varlen with the LM's sliding-window layer
    result = subprocess.run(
        [sys.executable, "-m", "vlmtrain.cli", "export", str(run_dir), str(tmp_path / "export")],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "a native Gemma 4 checkpoint (Gemma4ForConditionalGeneration and Gemma4Processor" in result.stdout
    trained = open_run(run_dir)
    native = AutoModelForImageTextToText.from_pretrained(tmp_path / "export").eval()
    image = at_budget(Image.open(pictures()[0]), trained.geometry, 140)
    prompt = f"Look {GEMMA4_IMAGE_TOKENS['image_token']} and say: "
    input_ids, _ = trained.inputs([image], prompt, budget=140)
    pixels = Gemma4ImageProcessorPil(max_soft_tokens=140)([image], return_tensors="pt")
    with torch.no_grad():
        served = native(input_ids=input_ids, pixel_values=pixels["pixel_values"], image_position_ids=pixels["image_position_ids"])
    torch.testing.assert_close(served.logits, trained.logits([image], prompt, budget=140), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("version", "accepted"), [("4.57.1", False), ("5.22.0", False), ("5.23.0", True), ("5.24.0.dev0", True)])
def test_the_shipped_code_refuses_a_transformers_too_old_for_it_in_one_line(version: str, accepted: bool):
    from vlmtrain.modeling.configuration_vlmtrain import require_transformers

    if accepted:
        require_transformers(version)
    else:
        with pytest.raises(ImportError, match=rf"needs transformers >= 5\.23, found {version}"):
            require_transformers(version)


def test_the_shipped_modules_import_each_other_relatively():
    # an export copies vlmtrain/modeling/*.py into its folder, where vlmtrain is not installed: an absolute
    # import of vlmtrain there fails only when the export is loaded
    import ast

    import vlmtrain.modeling

    absolute = []
    for file in sorted(Path(vlmtrain.modeling.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            absolute += [f"{file.name}:{node.lineno} {name}" for name in names if name.split(".")[0] == "vlmtrain"]
    assert absolute == []


@pytest.mark.slow
def test_a_gemma4_shaped_export_answers_a_video_in_transformers_with_the_training_logits(gemma4_export):
    """Gemma 4's video layout (each frame's ``mm:ss`` time, then its soft tokens as Gemma 4's video token between
    <|image> and <image|>, frames joined by a space): the native export, given the frames as Gemma 4's video
    input (pixel values from its image processor, frame by frame), computes what training computes."""
    from PIL import ImageOps

    model, out = gemma4_export
    budget = 70
    picture = at_budget(Image.open(pictures()[0]), model.geometry, budget)
    frames = [picture, ImageOps.mirror(picture), ImageOps.invert(picture)]  # 3 frames 0.5 s apart (data.video.fps 2)
    question = [{"role": "user", "content": "<video>What changes?"}]
    ids, images = model.inputs([], messages=question, videos=[frames])
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokens = model.geometry.image(picture.height, picture.width, budget).tokens
    block = GEMMA4_IMAGE_TOKENS["boi_token"] + "<|video|>" * tokens + GEMMA4_IMAGE_TOKENS["eoi_token"]
    assert f"00:00 {block} 00:00 {block} 00:01 {block}What changes?" in tokenizer.decode(ids[0])  # Gemma4Processor's text
    config = json.loads((out / "config.json").read_text())
    assert config["video_token_id"] == tokenizer.convert_tokens_to_ids("<|video|>")
    # its video processor (it needs torchvision) at the video budget, sampling as training: its settings given to
    # the sampler it calls, transformers' default one, pick the frames training took (all 3 of these)
    settings = json.loads((out / "processor_config.json").read_text())
    video, image = settings["video_processor"], settings["image_processor"]
    assert (video["max_soft_tokens"], video["patch_size"], video["pooling_kernel_size"]) == (
        budget, image["patch_size"], image["pooling_kernel_size"])
    metadata = VideoMetadata(total_num_frames=3, fps=2.0, duration=1.5)
    assert default_sample_indices_fn(metadata, num_frames=video["num_frames"], fps=video["fps"]).tolist() == [0, 1, 2]
    pixels = AutoImageProcessor.from_pretrained(out)(frames, max_soft_tokens=budget, return_tensors="pt")
    native = AutoModelForImageTextToText.from_pretrained(out).eval()
    with torch.no_grad():
        served = native(
            input_ids=ids, pixel_values_videos=pixels["pixel_values"], video_position_ids=pixels["image_position_ids"],
            num_frames_per_video=torch.tensor([3]),
        ).logits
    trained = model.logits([], messages=question, videos=[frames])
    torch.testing.assert_close(served, trained, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(load(out).logits([], messages=question, videos=[frames]), trained, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_qlora_trains_adapters_over_a_4bit_lm_and_exports_them_merged_into_its_full_precision_weights(demo_dir, tmp_path):
    check_qlora(demo_dir, tmp_path)


def check_qlora(demo_dir: Path, tmp_path: Path, *overrides: str) -> None:
    """A QLoRA run (its recipe with ``overrides``): the LM's linear layers 4-bit and frozen under the adapters;
    the export merges the trained adapter into the LM's full-precision weights, as PEFT applies it to them."""
    bnb = pytest.importorskip("bitsandbytes")  # in the dev extras; a runtime install has it with vlmtrain[qlora]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = build_byte_tokenizer()
    wide = {**TINY_LLAMA, "hidden_size": 64, "intermediate_size": 128}  # rows of bitsandbytes' 64-value blocks
    build_lm(LMConfig(hf_config=wide), tokenizer).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    qlora = (f"model.lm.path={tmp_path / 'llama'}", "model.lm.hf_config=null", *LORA, "model.lm.lora.dropout=0",
             "model.lm.quantization=nf4", "optim.lm.lr=0.01", *overrides)
    module = built(small_recipe(demo_dir, tmp_path / "run", *qlora))
    four_bit = [name for name, layer in module.model.lm.named_modules() if isinstance(layer, bnb.nn.Linear4bit)]
    assert len(four_bit) == 7  # q k v o gate up down (two under LoRA), the head and embeddings kept
    trained = [name for name, parameter in module.model.lm.named_parameters() if parameter.requires_grad]
    assert trained and all("lora_" in name for name in trained)  # the 4-bit base stays frozen

    run_cli(small_overrides(demo_dir, tmp_path / "run", *qlora))
    export(tmp_path / "run", tmp_path / "export")
    loaded = load(tmp_path / "export")
    assert not any(isinstance(layer, bnb.nn.Linear4bit) for layer in loaded.model.modules())
    # the export: the adapter merged into the LM's full-precision weights, as PEFT puts it onto them
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "llama"), tmp_path / "run" / "adapter")
    tokens = torch.randint(0, 250, (2, 12))
    with torch.no_grad():
        merged = loaded.model.lm(input_ids=tokens).logits
        torch.testing.assert_close(merged, reference.eval()(input_ids=tokens).logits, atol=1e-5, rtol=1e-5)
        with reference.disable_adapter():
            plain = reference(input_ids=tokens).logits
    assert (merged - plain).abs().max() > 1e-3  # the adapter trained, and the export carries it
    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert adapter and all(tensor.abs().max() > 0 for name, tensor in adapter.items() if "lora_B" in name)
