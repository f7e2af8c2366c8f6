"""Whole Qwen2.5-VL and Qwen3-VL checkpoints: read into vlmtrain (tower, patch merger, Qwen3-VL's DeepStack and the
M-RoPE language model), they compute exactly what transformers' Qwen2_5_VLForConditionalGeneration and
Qwen3VLForConditionalGeneration compute at every budget; packed rows give each sample its own 3-D positions, so
packed steps equal padded ones."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from runpy import run_path

import pytest
import torch
from helpers import ROOT, built, in_use, losses_and_grads, random_images, small_recipe
from transformers.video_utils import VideoMetadata

from vlmtrain.data.builder import BatchBuilder
from vlmtrain.data.config import TextConfig
from vlmtrain.data.samples import RawSample
from vlmtrain.data.sources import read_shard
from vlmtrain.export.format import TextFormat
from vlmtrain.inference import ExportedModel
from vlmtrain.modeling.geometry import LEVELS
from vlmtrain.plan import plan_run
from vlmtrain.text.encoding import TextEncoder

VISION_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
IMAGE = "<|image_pad|>"  # the marker: vlmtrain writes it as Qwen's processor does, <|vision_start|> ... <|vision_end|>


FAMILIES = ("qwen2_5_vl", "qwen3_vl")
# what each family's own image processor is given (its releases' preprocessor_config.json): min_pixels, the side of a
# token's square, patch size, normalisation; and its transformers class
PROCESSOR = {
    "qwen2_5_vl": (3136, 28, 14, [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
    "qwen3_vl": (65536, 32, 16, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
}
MODEL_CLASS = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration"}


@pytest.fixture(scope="module", params=FAMILIES)
def qwen_checkpoint(request, tmp_path_factory) -> tuple[Path, object]:
    """A tiny checkpoint of each Qwen-VL family with random weights (and a tokenizer knowing its vision tokens),
    and the transformers model it holds (scripts/tiny_qwen.py)."""
    folder = tmp_path_factory.mktemp(request.param)
    return folder, run_path(str(ROOT / "scripts" / "tiny_qwen.py"))["write_tiny_qwen"](folder, family=request.param)


def family_of(whole) -> str:
    return whole.config.model_type


def image_processor(family: str, budget: int):
    """The family's own image processor at ``budget``'s max_pixels."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    min_pixels, cell, patch, mean, std = PROCESSOR[family]
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": min_pixels, "longest_edge": budget * cell * cell}, patch_size=patch, image_mean=mean,
        image_std=std,
    )


def served_images(geometry, budget: int, sizes: list[tuple[int, int]], seed: int) -> list:
    """Random images at a size that both vlmtrain and the family's processor leave as it is at ``budget`` (where
    Qwen's processor grows an image to min_pixels past the budget, vlmtrain keeps the cap: see
    test_geometry.py); the sizes are what vlmtrain gives them."""
    return random_images(geometry, budget, [geometry.image(*size, budget).resize for size in sizes], seed)


def qwen_overrides(folder: Path, family: str = "qwen2_5_vl") -> tuple[str, ...]:
    """The small recipe reading the whole checkpoint: its tower (merger included) and its language model."""
    return (
        f"model.vision.backbone={family}", f"model.vision.path={folder / 'checkpoint'}", "model.vision.patch_size=null",
        "model.pooling.kind=tower", "model.pooling.size=null", "model.projector.kind=identity",
        f"model.lm.path={folder / 'checkpoint'}", "model.lm.hf_config=null", f"model.lm.tokenizer={folder / 'tokenizer'}",
        "model.lm.image_token=<|image_pad|>", f"data.text.prompt={IMAGE}", "budget.levels=[70,140,280,560,1120]",
        "budget.default=280", "data.batching.batch_tokens=2400",
    )


def test_a_recipe_names_the_whole_checkpoint_and_its_family_fills_in_every_part(demo_dir, qwen_checkpoint, tmp_path):
    from vlmtrain.config import RecipeError, load_recipe

    folder, whole = qwen_checkpoint
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model:\n  checkpoint: {folder / 'checkpoint'}\n  lm:\n    tokenizer: {folder / 'tokenizer'}\n"
                      f"data:\n  train: {demo_dir}/train-{{000000..000003}}.tar\n")
    short = plan_run(load_recipe(recipe)).model
    explicit = plan_run(small_recipe(demo_dir, tmp_path / "run", *qwen_overrides(folder, family_of(whole)))).model
    assert (short.vision, short.pooling, short.projector, short.lm) == (
        explicit.vision, explicit.pooling, explicit.projector, explicit.lm
    )
    assert load_recipe(recipe, ["model.lm.path=/elsewhere"]).model.lm.path == "/elsewhere"  # what the recipe sets wins
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(RecipeError, match=r"model.checkpoint: .*llama holds a llama model; whole checkpoints read: gemma4, "):
        load_recipe(recipe, [f"model.checkpoint={tmp_path / 'llama'}"])


def test_the_family_recipe_builds_its_model_from_a_local_checkpoint(demo_dir, qwen_checkpoint, tmp_path):
    """The real-scale recipe (LoRA, chunked loss, gradient checkpointing, per-image budgets) with its paths pointed
    at a local checkpoint of its family builds the model it describes: the family's, adapters on the LM only."""
    from vlmtrain.config import load_recipe

    folder, whole = qwen_checkpoint
    family = family_of(whole)
    path = ROOT / "recipes" / {"qwen2_5_vl": "qwen2.5-vl-7b-lora-zero3.yaml", "qwen3_vl": "qwen3-vl-8b-lora-zero3.yaml"}[family]
    recipe = load_recipe(path, [
        f"model.vision.path={folder / 'checkpoint'}", f"model.lm.path={folder / 'checkpoint'}",
        f"model.lm.tokenizer={folder / 'tokenizer'}", f"data.train={demo_dir}/train-000000.tar", "data.val=null",
        f"run_dir={tmp_path / 'run'}",
    ])
    model = built(recipe).model
    assert model.backbone.model.config.model_type == f"{family}_vision" and model.loss_chunk == 1024
    adapted = {name.split(".")[0] for name, _ in model.named_parameters() if "lora_" in name}
    assert adapted == {"lm"} and model.geometry.min_pixels == PROCESSOR[family][0]


def test_a_whole_checkpoint_computes_what_transformers_computes_at_every_budget(demo_dir, qwen_checkpoint, tmp_path):
    folder, whole = qwen_checkpoint
    family = family_of(whole)
    recipe = small_recipe(demo_dir, tmp_path / "run", *qwen_overrides(folder, family))
    module = built(recipe)
    assert type(module.model.lm).__name__ == {"qwen2_5_vl": "Qwen25VLTextForCausalLM", "qwen3_vl": "Qwen3VLTextForCausalLM"}[
        family
    ]
    model = ExportedModel(module.model.eval(), plan_run(recipe).tokenizer, module.plan.model, TextFormat.of(recipe.data.text))
    image_token = whole.config.image_token_id
    for budget in LEVELS:
        for count in (1, 2):
            images = served_images(model.geometry, budget, [(300, 451), (900, 420)][:count], seed=budget + count)
            prompt = f"Look {IMAGE * count} and say: "
            input_ids, batch = model.inputs(images, prompt, budget)
            if count == 2:  # written as Qwen's processor writes images: <|vision_start|> placeholders <|vision_end|>
                start, pad, end = (model.tokenizer.convert_tokens_to_ids(token) for token in VISION_TOKENS)
                ids, first = input_ids[0].tolist(), input_ids[0].tolist().index(pad)
                tokens = batch.token_counts.tolist()
                assert ids[first - 1 : first + tokens[0] + 3] == [start, *[pad] * tokens[0], end, start, pad]
            served = image_processor(family, budget)(images=images, return_tensors="pt")
            with torch.no_grad():
                expected = whole(
                    input_ids=input_ids, pixel_values=served["pixel_values"], image_grid_thw=served["image_grid_thw"],
                    mm_token_type_ids=(input_ids == image_token).int(),
                ).logits
            torch.testing.assert_close(model.logits(images, prompt, budget), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # greedy generation continues the 3-D positions (and gives DeepStack the prompt) as Qwen's own
        tokens = whole.generate(input_ids=input_ids, pixel_values=served["pixel_values"], image_grid_thw=served["image_grid_thw"],
                                mm_token_type_ids=(input_ids == image_token).int(), max_new_tokens=8, do_sample=False)
    expected_text = model.tokenizer.decode(tokens[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert model.generate(images, prompt, budget, max_new_tokens=8) == expected_text


def qwen_processor(folder: Path):
    """The folder's processor (Qwen2_5_VLProcessor, Qwen3VLProcessor): AutoProcessor where torchvision is installed;
    without it (transformers cannot build Qwen's video processor) from the folder's image processor and tokenizer,
    no video processor."""
    import importlib.util
    from unittest import mock

    import transformers
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, ProcessorMixin

    if importlib.util.find_spec("torchvision") is not None:
        return AutoProcessor.from_pretrained(folder)
    processor_class = getattr(transformers, json.loads((folder / "preprocessor_config.json").read_text())["processor_class"])
    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, argument: None):
        return processor_class(
            image_processor=AutoImageProcessor.from_pretrained(folder), tokenizer=AutoTokenizer.from_pretrained(folder),
            video_processor=None,
        )


def test_a_trained_model_exports_as_a_native_checkpoint_with_training_outputs_at_every_budget(
    demo_dir, qwen_checkpoint, tmp_path
):
    """LoRA merged, the export is the family's own checkpoint (no remote code): transformers' class and Qwen's
    processor, the budget given as its max_pixels, give training's ids, logits and greedy tokens; so does
    vlmtrain.load."""
    import transformers
    from transformers import AutoModelForImageTextToText

    from vlmtrain.export.run import TrainedModel
    from vlmtrain.export.write import write_export
    from vlmtrain.inference import load

    folder, whole = qwen_checkpoint
    family = family_of(whole)
    recipe = small_recipe(demo_dir, tmp_path / "run", *qwen_overrides(folder, family), "model.lm.lora.rank=4")
    module = built(recipe)
    with torch.no_grad():
        for name, parameter in module.model.named_parameters():
            if "lora_B" in name:  # as if trained: the adapter changes the model
                parameter.normal_(0, 0.5)
    text_format = TextFormat.of(recipe.data.text)
    trained = TrainedModel(module.model, module.plan.tokenizer, module.plan.model, text_format, recipe, tmp_path)
    line = write_export(trained, recipe, tmp_path / "export")
    assert line.startswith(f"a native {dict(qwen2_5_vl='Qwen2.5-VL', qwen3_vl='Qwen3-VL')[family]} checkpoint")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_type"] == family and "auto_map" not in config and not list((tmp_path / "export").glob("*.py"))
    vision_ids = [module.plan.tokenizer.convert_tokens_to_ids(token) for token in ("<|image_pad|>", "<|video_pad|>")]
    assert [config["image_token_id"], config["video_token_id"]] == vision_ids  # vLLM reads both (scripts/check_vllm.py)
    native = AutoModelForImageTextToText.from_pretrained(tmp_path / "export").eval()
    assert type(native) is getattr(transformers, MODEL_CLASS[family])
    processor, loaded = qwen_processor(tmp_path / "export"), load(tmp_path / "export")
    reference = ExportedModel(module.model.eval(), module.plan.tokenizer, module.plan.model, text_format)
    prompt = f"Look {IMAGE} and say: "
    served_prompt = processor.tokenizer.bos_token + "Look " + "".join(VISION_TOKENS) + " and say: "
    min_pixels, cell = PROCESSOR[family][:2]
    for budget in LEVELS:
        images = served_images(loaded.geometry, budget, [(300, 451)], seed=budget)
        size = {"shortest_edge": min_pixels, "longest_edge": budget * cell * cell}
        inputs = processor(text=served_prompt, images=images, images_kwargs={"size": size}, return_tensors="pt")
        assert torch.equal(inputs["input_ids"], reference.inputs(images, prompt, budget)[0])
        trained_logits = reference.logits(images, prompt, budget)
        with torch.no_grad():
            torch.testing.assert_close(native(**inputs).logits, trained_logits, atol=1e-5, rtol=1e-5)
            tokens = native.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1] :]
        torch.testing.assert_close(loaded.logits(images, prompt, budget), trained_logits, atol=1e-5, rtol=1e-5)
        generated = loaded.generate(images, prompt, budget, max_new_tokens=6)
        assert processor.tokenizer.decode(tokens, skip_special_tokens=True) == generated
    written = json.loads((tmp_path / "export" / "preprocessor_config.json").read_text())
    assert written["size"] == {"shortest_edge": min_pixels, "longest_edge": module.plan.model.default_budget * cell * cell}
    assert (written["patch_size"], written["image_mean"], written["image_std"]) == PROCESSOR[family][2:]

    # with the adapter kept apart the export is vlmtrain's remote code: its generation continues the 3-D
    # positions by itself (transformers passes 1-D ones after the prompt)
    from transformers import AutoProcessor

    write_export(trained, recipe, tmp_path / "kept", keep_adapter=True)
    served = AutoModelForImageTextToText.from_pretrained(tmp_path / "kept", trust_remote_code=True).eval()
    remote = AutoProcessor.from_pretrained(tmp_path / "kept", trust_remote_code=True)
    images = served_images(loaded.geometry, 280, [(300, 451)], seed=5)
    inputs = remote(text=prompt, images=images, budget=280)
    with torch.no_grad():
        torch.testing.assert_close(served(**inputs).logits, reference.logits(images, prompt, 280), atol=1e-5, rtol=1e-5)
        tokens = served.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert remote.tokenizer.decode(tokens, skip_special_tokens=True) == reference.generate(images, prompt, 280, max_new_tokens=6)

    # its processor takes a video's frames and writes them as the family does (Qwen2.5-VL: one block, each pair's
    # time in its M-RoPE positions; Qwen3-VL: a block per pair after its time): training's ids and logits
    from vlmtrain.text.chat import generation_prompt

    frames = served_images(loaded.geometry, 70, [(300, 451)] * 5, seed=6)
    question = [{"role": "user", "content": "<video>What changes?"}]
    inputs = remote(text=generation_prompt(remote.tokenizer, question), videos=[frames])
    ids, _ = reference.inputs([], messages=question, videos=[frames])
    assert inputs["input_ids"].tolist() == ids.tolist()
    times = inputs.get("image_token_times")  # frames 0-3 as 2 pairs in one block; frames 0-4 as 3 pairs, 3 blocks
    # Qwen2.5-VL: the second pair at 4 tokens a second x 2 / (4 of 5 frames x 2 a second): 5
    assert (None if times is None else times.tolist()) == {"qwen2_5_vl": [-1, 5], "qwen3_vl": None}[family]
    with torch.no_grad():
        torch.testing.assert_close(served(**inputs).logits, reference.logits([], messages=question, videos=[frames]),
                                   atol=1e-5, rtol=1e-5)


def test_packed_rows_give_each_sample_its_own_3d_positions(demo_dir, qwen_checkpoint, caption_dir, tmp_path):
    """Packed (one row, and rows of ~200 tokens) equals padded for mixed budgets, two-image and text-only
    samples: per-sample losses and gradients (fp32, 1e-5); and every sample's positions are what
    Qwen's get_rope_index gives it alone."""
    folder, whole = qwen_checkpoint
    recipe = small_recipe(demo_dir, tmp_path / "run", *qwen_overrides(folder, family_of(whole)))
    module = built(recipe)
    model = module.model
    encoder, decoding = TextEncoder(module.plan.tokenizer, "<|image_pad|>"), module.plan.recipe.data.decoding

    def builder_for(prompt: str) -> BatchBuilder:
        return BatchBuilder(model.geometry, encoder, TextConfig(prompt=prompt, target_field="text", max_length=96), decoding)

    captions = [s for url in sorted(map(str, caption_dir.glob("*.tar"))) for s in read_shard(url) if isinstance(s, RawSample)]
    pair = replace(captions[2], key="pair", images=captions[2].images + captions[3].images, budgets=[None, None],
                   sizes=captions[2].sizes + captions[3].sizes, record={**captions[2].record, "text": "two"})
    text_only = replace(captions[4], key="text", images=[], sizes=[], budgets=[])
    builder = builder_for(f"Look: {IMAGE} says")
    encoded = [builder.encode(captions[0], 70), builder_for(f"Look: {IMAGE} then {IMAGE} say").encode(pair, (280, 70)),
               builder_for("Say").encode(text_only, ()), builder.encode(captions[1], 140)]
    for row_tokens in (None, 200):
        results = {}
        for packed in (True, False):
            inputs = builder.collate(encoded, None, packed=packed, row_tokens=row_tokens).inputs
            results[packed] = (*losses_and_grads(model, inputs), inputs)
        (packed, packed_grads, packed_inputs), (padded, padded_grads, _) = results[True], results[False]
        torch.testing.assert_close(packed.loss_sum, padded.loss_sum, atol=1e-5, rtol=1e-5)
        assert packed.tokens.tolist() == padded.tokens.tolist() and packed.tokens.tolist()[2] > 0
        for name, grad in padded_grads.items():
            torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
        positions = model.lm_inputs(packed_inputs)["position_ids"]
        grids = iter(packed_inputs.images.patch_grids.tolist())
        for index, sample in enumerate(encoded):  # (a constant shift of a sample would not change its loss: RoPE)
            ids = torch.tensor([sample.text.input_ids])
            thw = torch.tensor([[1, *next(grids)] for _ in sample.images]) if sample.images else None
            expected = whole.model.get_rope_index(ids, (ids == whole.config.image_token_id).int(), image_grid_thw=thw)[0]
            assert torch.equal(positions[:, packed_inputs.sequence_ids == index], expected[:, 0]), (row_tokens, index)
    model.loss_chunk = 7  # the chunked loss (model.lm.loss_chunk_tokens) runs the same LM layers (DeepStack's too)
    chunked, chunked_grads = losses_and_grads(model, packed_inputs)
    torch.testing.assert_close(chunked.loss_sum, packed.loss_sum, atol=1e-5, rtol=1e-5)
    for name, grad in packed_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_a_whole_checkpoint_trains_under_zero3_on_two_processes_and_exports_what_it_trained(demo_dir, qwen_checkpoint, tmp_path):
    """DeepSpeed ZeRO-3, LoRA, a budget per image, two CPU processes: the run ends, and its native export
    computes what its checkpoint computes."""
    from helpers import LORA, TWO_PROCESSES, run_cli, small_overrides

    from vlmtrain.export.write import export
    from vlmtrain.inference import load, open_run

    folder, whole = qwen_checkpoint
    run = tmp_path / "run"
    run_cli(small_overrides(demo_dir, run, *qwen_overrides(folder, family_of(whole)), *TWO_PROCESSES, *LORA,
                            "trainer.strategy=deepspeed",
                            "trainer.deepspeed.stage=3", "budget.per_image=independent"))
    export(run, tmp_path / "export")
    trained, exported = open_run(run), load(tmp_path / "export")
    images = served_images(exported.geometry, 140, [(300, 451), (900, 420)], seed=7)
    prompt = f"Look {IMAGE} and {IMAGE}: "
    torch.testing.assert_close(exported.logits(images, prompt, [140, 70]), trained.logits(images, prompt, [140, 70]),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_video_is_written_as_the_familys_processor_writes_it_and_its_export_answers_it_with_the_training_logits(
    demo_dir, tmp_path, family
):
    """Each family's own video layout: two consecutive frames share one temporal patch (the last one filled with
    its last frame); Qwen3-VL writes each pair after ``<t seconds>`` in its own vision block of ``<|video_pad|>``
    tokens, Qwen2.5-VL all pairs in one block, their times in their M-RoPE positions. Training, a model in use and
    the native export (transformers' class, given the video's patches from Qwen's image processor frame by frame)
    compute the same logits."""
    import io

    from transformers import AutoModelForImageTextToText
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vlmtrain.data.video import with_frames
    from vlmtrain.export.run import TrainedModel
    from vlmtrain.export.write import write_export
    from vlmtrain.inference import load
    from vlmtrain.modeling.prompt import FrameLayout
    from vlmtrain.train.run import batch_builder

    folder = tmp_path / family
    run_path(str(ROOT / "scripts" / "tiny_qwen.py"))["write_tiny_qwen"](folder, family=family)
    video = ("data.video.fps=2", "data.video.budget=70", "data.text.max_length=512")
    recipe = small_recipe(demo_dir, tmp_path / "run", *qwen_overrides(folder, family), *video)
    module = built(recipe)
    if family == "qwen3_vl":
        assert module.plan.frames == FrameLayout(frames=2, stamp="seconds", token="<|video_pad|>", sampling="linspace")
    else:  # Qwen2.5-VL's default tokens_per_second
        assert module.plan.frames == FrameLayout(
            frames=2, stamp="none", token="<|video_pad|>", joined=True, tokens_per_second=4, sampling="stride"
        )
    frames = served_images(module.plan.geometry, 70, [(300, 451)] * 3, seed=3)  # 3 frames, 2 a second
    files = []
    for frame in frames:
        buffer = io.BytesIO()
        frame.save(buffer, format="PNG")
        files.append(buffer.getvalue())
    question = [{"role": "user", "content": "<video>What changes?"}]

    # training: the frames as a stored video given as images (0.25, 0.75 and 1.25 s), encoded by the data pipeline
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What changes?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "colours"}]}]
    facts = {"images": [{"width": frame.width, "height": frame.height} for frame in frames], "frames": 3}
    sample = with_frames(RawSample("k", {"messages": messages}, videos=[(files, facts)]), recipe.data.video, module.plan.frames)
    builder = batch_builder(module.plan)
    encoded = builder.encode(sample, sample.budgets)
    batch = builder.collate([encoded], None, packed=False)
    with torch.no_grad():
        trained = module.model.eval()(batch.inputs)

    # the frames the family's video processor samples of 3 at 2 a second: Qwen3-VL all 3 (0, 0.5, 1 s: two temporal
    # patches, the second its last frame twice); Qwen2.5-VL a whole number of patches, frames 0 and 1
    tokens = module.plan.geometry.image(frames[0].height, frames[0].width, 70).tokens
    block = "<|vision_start|>" + "<|video_pad|>" * tokens + "<|vision_end|>"
    expected = {  # the family's processor's text for these frames
        "qwen3_vl": f"<0.2 seconds>{block}<1.0 seconds>{block}What changes?",
        "qwen2_5_vl": f"{block}What changes?",
    }[family]
    units = 2 if family == "qwen3_vl" else 1
    model = in_use(module)
    ids, images = model.inputs([], messages=question, videos=[frames])
    assert expected in module.plan.tokenizer.decode(ids[0])
    assert images.token_counts.tolist() == [tokens] * units
    assert ids[0].tolist() == batch.inputs.input_ids[0, : ids.shape[1]].tolist()
    torch.testing.assert_close(model.logits([], messages=question, videos=[frames]), trained[:, : ids.shape[1]])

    # the native export, given what the family's video processor gives: each temporal patch its two frames'
    # patches (Qwen's image processor repeats one frame over the patch: take each frame's first)
    write_export(TrainedModel(module.model, module.plan.tokenizer, module.plan.model, TextFormat.of(recipe.data.text),
                              recipe, tmp_path), recipe, tmp_path / "export")
    native = AutoModelForImageTextToText.from_pretrained(tmp_path / "export").eval()
    min_pixels, cell, patch, mean, std = PROCESSOR[family]
    video_settings = json.loads((tmp_path / "export" / "video_preprocessor_config.json").read_text())
    assert {name: video_settings[name] for name in ("fps", "min_frames", "max_frames", "do_sample_frames", "size")} == {
        "fps": 2.0, "min_frames": 2, "max_frames": 16, "do_sample_frames": True,
        "size": {"shortest_edge": min_pixels, "longest_edge": 70 * cell * cell * (16 if family == "qwen3_vl" else 1)},
    }
    if family == "qwen3_vl":  # its video processor samples, and its processor writes, training's frames and text
        from transformers import Qwen3VLProcessor
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        from vlmtrain.modeling.prompt import QWEN_IMAGE

        served = object.__new__(Qwen3VLProcessor)  # its constructor looks its video processor up in torchvision's absence
        served.video_processor = Qwen3VLVideoProcessor.from_pretrained(tmp_path / "export")
        served.video_token, served.vision_start_token, served.vision_end_token = "<|video_pad|>", *QWEN_IMAGE[1:]
        metadata = VideoMetadata(total_num_frames=3, fps=2.0, duration=1.5)
        metadata.frames_indices = served.video_processor.sample_frames(metadata)
        assert metadata.frames_indices.tolist() == [0, 1, 2]
        grid = torch.tensor([[units, *module.plan.geometry.image(frames[0].height, frames[0].width, 70).patch_grid]])
        text = served.replace_video_token({"video_grid_thw": grid, "video_metadata": [metadata]}, 0)
        assert text + "What changes?" == expected
    processor = Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": 70 * cell * cell},
                                         patch_size=patch, image_mean=mean, image_std=std)
    per_frame = [processor(images=[frame], return_tensors="pt") for frame in frames]
    grid = per_frame[0]["image_grid_thw"][0]
    first = [out["pixel_values"].view(-1, 3, 2, patch, patch)[:, :, 0] for out in per_frame]
    patches = [torch.stack([first[0], first[1]], dim=2), torch.stack([first[2], first[2]], dim=2)][:units]
    video_id = module.plan.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    inputs = {  # what the family's processor gives beside the ids: the patches, their grid, each token's modality (2: video)
        "pixel_values_videos": torch.cat(patches).flatten(1), "video_grid_thw": torch.tensor([[units, *grid[1:].tolist()]]),
        "mm_token_type_ids": (ids == video_id).long() * 2,
    }
    if family == "qwen2_5_vl":  # temporal patch / frames sampled per second of the video (2 of 3 at 2 a second)
        sampled = VideoMetadata(total_num_frames=3, fps=2.0, frames_indices=[0, 1]).sampled_fps
        inputs["second_per_grid_ts"] = torch.tensor([2 / sampled])
    with torch.no_grad():
        served = native(input_ids=ids, **inputs).logits
    torch.testing.assert_close(served, trained[:, : ids.shape[1]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(load(tmp_path / "export").logits([], messages=question, videos=[frames]), served,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_packed_rows_give_each_video_sample_the_positions_its_family_gives_it_alone(demo_dir, qwen_checkpoint, tmp_path):
    """Two video samples (3 and 5 frames: 2 and 3 temporal patches) and an image sample packed in one row: packed
    equals padded (per-sample losses, fp32), and each sample's 3-D positions are what the family's get_rope_index
    gives it alone (Qwen2.5-VL: one block per video, patches time-scaled; Qwen3-VL: a block per patch)."""
    import io

    from vlmtrain.data.video import with_frames
    from vlmtrain.train.run import batch_builder

    folder, whole = qwen_checkpoint
    family = family_of(whole)
    recipe = small_recipe(demo_dir, tmp_path / "run", *qwen_overrides(folder, family), "data.video.budget=70",
                          "data.text.max_length=512")
    module = built(recipe)
    builder = batch_builder(module.plan)

    def video_sample(key: str, count: int, seed: int) -> RawSample:
        frames = served_images(module.plan.geometry, 70, [(240, 320)] * count, seed=seed)
        files = []
        for frame in frames:
            buffer = io.BytesIO()
            frame.save(buffer, format="PNG")
            files.append(buffer.getvalue())
        facts = {"images": [{"width": frame.width, "height": frame.height} for frame in frames], "frames": count}
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What changes?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": f"{key} changes"}]}]
        sample = RawSample(key, {"messages": messages}, videos=[(files, facts)])
        return with_frames(sample, recipe.data.video, module.plan.frames)

    picture = served_images(module.plan.geometry, 140, [(300, 451)], seed=9)[0]
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    image_messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "a picture"}]}]
    image_sample = RawSample("image", {"messages": image_messages}, [buffer.getvalue()], [(picture.height, picture.width)],
                             budgets=[140])
    samples = [video_sample("three", 3, 1), image_sample, video_sample("five", 5, 2)]
    encoded = [builder.encode(sample, sample.budgets) for sample in samples]
    packed_inputs = builder.collate(encoded, None, packed=True).inputs
    padded_inputs = builder.collate(encoded, None, packed=False).inputs
    with torch.no_grad():
        packed, padded = (module.model.eval().sample_losses(inputs) for inputs in (packed_inputs, padded_inputs))
    torch.testing.assert_close(packed.loss_sum, padded.loss_sum, atol=1e-5, rtol=1e-5)
    positions = module.model.lm_inputs(packed_inputs)["position_ids"]
    video_id = module.plan.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    for index, (sample, one) in enumerate(zip(samples, encoded, strict=True)):
        ids = torch.tensor([one.text.input_ids])
        types = (ids == whole.config.image_token_id).long() + 2 * (ids == video_id).long()
        grids = [geometry.patch_grid for *_, geometry in one.images]
        if sample.key == "image":
            expected = whole.model.get_rope_index(ids, types, image_grid_thw=torch.tensor([[1, *grids[0]]]))[0]
        else:
            thw = torch.tensor([[len(grids), *grids[0]]])
            # Qwen2.5-VL's processor: a temporal patch's seconds are 2 / the frames it sampled per second of the video
            # (Qwen2VLVideoProcessor takes frames 0-1 of 3 and 0-3 of 5 at 2 a second: test_video.py)
            total, sampled = {"three": (3, [0, 1]), "five": (5, [0, 1, 2, 3])}[sample.key]
            metadata = VideoMetadata(total_num_frames=total, fps=recipe.data.video.fps, frames_indices=sampled)
            extra = {"second_per_grid_ts": torch.tensor([2 / metadata.sampled_fps])} if family == "qwen2_5_vl" else {}
            expected = whole.model.get_rope_index(ids, types, video_grid_thw=thw, **extra)[0]
        assert torch.equal(positions[:, packed_inputs.sequence_ids == index], expected[:, 0]), sample.key
