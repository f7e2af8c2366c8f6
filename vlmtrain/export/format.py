"""The export format, in one place: the folder's names and version, what ``vision/config.json`` holds (its own
schema: :class:`ExportConfig`), what a layout (where the weights are) must do, and the checks that refuse
an export that was edited or damaged. Writers: :mod:`.write`; readers: :mod:`.layouts` and :func:`vlmtrain.load`.

    OUT/vision/config.json  format, layout, the model description, the text format, the LoRA adapter folder,
                            and a fingerprint of every weights file (another export's files are refused)
    OUT/...                 the layout's files (:mod:`.vlmtrain_layout`, or a family's own checkpoint), each
                            safetensors file keeping the description in its metadata; never a pickle
    OUT/selector/           the budget selector, when one was trained (vlmtrain train-selector)
    OUT/recipe.yaml, OUT/README.md   the run's recipe and a model card (:mod:`.card`)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import PreTrainedTokenizerBase

from vlmtrain.config import RecipeError, structured
from vlmtrain.data.config import TextConfig, VideoConfig
from vlmtrain.errors import UserError
from vlmtrain.model.description import ModelDescription
from vlmtrain.modeling.backbones import BACKBONES
from vlmtrain.modeling.vlm import VisionLanguageModel
from vlmtrain.weights import open_weights

EXPORT_FORMAT = "vlmtrain-model/5"  # 5: fingerprints of the weights files; 4: the description has its own schema
READABLE_FORMATS = (EXPORT_FORMAT, "vlmtrain-model/4")  # a /4 export has no fingerprints: its files go unchecked
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # what transformers and torch would unpickle
VISION_DIR, LM_DIR, ADAPTER_DIR, SELECTOR_DIR = "vision", "lm", "lm-adapter", "selector"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
VISION_PARTS = ("backbone", "pooling", "projector")
DESCRIPTION_KEY = "vlmtrain.model"  # the description's copy in the metadata of every weights file
FINGERPRINT_VALUES = 16  # values read from each end of each tensor for its file's fingerprint


@dataclass
class TextFormat:
    """How the model was asked: the prompt template of prompt/target records (or the field holding each
    prompt), the field holding the target, and which assistant turns of a conversation were trained on."""

    prompt: str = "<image>"
    prompt_field: str | None = None
    target_field: str = "text"
    train_on: str = "all_assistant_turns"

    @classmethod
    def of(cls, text: TextConfig) -> TextFormat:
        """The format of a recipe's ``data.text`` section."""
        return cls(text.prompt, text.prompt_field, text.target_field, text.train_on)

    def text_config(self, max_length: int) -> TextConfig:
        """A ``data.text`` section that reads samples in this format, texts up to ``max_length`` tokens."""
        return TextConfig(**asdict(self), max_length=max_length)


@dataclass
class ExportConfig:
    """What ``vision/config.json`` holds: the format version, the layout, the model description, the text
    format, the LoRA adapter folder (None: merged), each weights file's fingerprint (path in the folder →
    :func:`weights_fingerprint`) and how videos were sampled into frames in training (the recipe's
    ``data.video``; an export written before videos trained gets the defaults)."""

    format: str = ""
    layout: str = ""
    model: ModelDescription = field(default_factory=ModelDescription)
    text: TextFormat = field(default_factory=TextFormat)
    adapter: str | None = None
    weights: dict[str, str] = field(default_factory=dict)
    video: VideoConfig = field(default_factory=VideoConfig)


class Layout(Protocol):
    """Where an export's weights are, with its writer beside its reader."""

    name: str
    lm_folder: str  # the language model's folder in the export ("." : the export's root)
    card_summary: str  # the model card's line on what the folder is

    def card_usage(self, prompt: str, budget: int) -> list[str]:
        """The model card's lines on serving the folder without vlmtrain."""

    def write(
        self,
        out: Path,
        model: VisionLanguageModel,
        description: ModelDescription,
        tokenizer: PreTrainedTokenizerBase,
        metadata: dict[str, str],
        video: VideoConfig,
        adapter: str | None = None,
    ) -> None:
        """Write ``model`` (its LM merged, or the base LM when ``adapter`` names the folder that keeps its LoRA
        adapter; only vlmtrain's own layout keeps one) into ``out``, every safetensors file with ``metadata``, its
        processor sampling videos as training did (``video``)."""

    def weights_file(self, folder: Path) -> Path:
        """A weights file of the export, whose metadata keeps the description."""

    def vision_weights(self, folder: Path) -> dict[str, torch.Tensor]:
        """The vision parts' weights (``backbone.``, ``pooling.``, ``projector.`` names)."""


def canonical_json(description: ModelDescription) -> str:
    """The description as compact, key-sorted JSON: what an export keeps in its weights files' metadata."""
    return json.dumps(description.to_dict(), sort_keys=True, separators=(",", ":"))


def first_difference(found: Any, expected: Any, key: str = "") -> tuple[str, Any, Any] | None:
    """The first dotted key at which two JSON-like values differ, with both values; None when equal."""
    if isinstance(found, dict) and isinstance(expected, dict):
        for name in sorted(found.keys() | expected.keys()):
            inner = first_difference(found.get(name), expected.get(name), f"{key}.{name}" if key else name)
            if inner is not None:
                return inner
        return None
    if isinstance(found, list) and isinstance(expected, list) and len(found) == len(expected):
        for index, (a, b) in enumerate(zip(found, expected, strict=True)):
            inner = first_difference(a, b, f"{key}[{index}]")
            if inner is not None:
                return inner
        return None
    return None if found == expected else (key, found, expected)


def read_json(path: Path) -> Any:
    """A JSON file of an export; one line when it is missing or not JSON."""
    if not path.is_file():
        raise UserError(f"{path}: missing (not a complete vlmtrain export)")
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise UserError(f"{path}: not valid JSON: {error}") from None


def read_config(folder: Path) -> ExportConfig:
    """The ``vision/config.json`` of the export ``folder``; a wrong version, an unknown, missing or mistyped
    key is one line naming it."""
    config_file = folder / VISION_DIR / CONFIG_FILE
    values = read_json(config_file)
    if not isinstance(values, dict) or values.get("format") not in READABLE_FORMATS:
        found = values.get("format") if isinstance(values, dict) else None
        raise UserError(f"{config_file}: format {found!r} is not {EXPORT_FORMAT!r} (not an export of this vlmtrain version)")
    for key in ("layout", "model", "text"):
        if key not in values:
            raise UserError(f"{config_file}: {key}: missing")
    try:
        config = structured(ExportConfig, [values], str(config_file))
    except RecipeError as error:
        raise UserError(str(error)) from None
    difference = first_difference(values["model"], config.model.to_dict())
    if difference is not None and difference[1] is None:  # the schema filled in a key the JSON lacks
        raise UserError(f"{config_file}: model.{difference[0]}: missing")
    kind = config.model.vision.kind
    if kind not in BACKBONES:
        raise UserError(f"{config_file}: model.vision.kind: {kind!r} is not one of {', '.join(BACKBONES)}")
    return config


def check_description(folder: Path, config: ExportConfig, weights_file: Path) -> None:
    """The description in ``vision/config.json`` is the one the weights were exported with (the copy in
    ``weights_file``'s metadata): a config edited after export is refused, naming the key."""
    if not weights_file.is_file():
        raise UserError(f"{weights_file}: missing (not a complete vlmtrain export)")
    with open_weights(weights_file) as handle:
        stored = (handle.metadata() or {}).get(DESCRIPTION_KEY)
    if stored is None:
        raise UserError(f"{weights_file}: holds no model description (not written by vlmtrain export)")
    difference = first_difference(config.model.to_dict(), json.loads(stored))
    if difference is not None:
        key, found, expected = difference
        raise UserError(
            f"{folder / VISION_DIR / CONFIG_FILE}: model.{key} is {found!r}, but the weights were exported with "
            f"{expected!r}; the config was edited after export (restore it, or export again)"
        )


def weights_fingerprint(path: Path) -> str:
    """A digest of a safetensors file from its tensors' names, dtypes, shapes and first and last few values
    (a few KB read, whatever the file's size): tells one export's weights from another's of the same shapes."""
    digest = hashlib.sha256()
    with open_weights(path) as handle:
        for name in sorted(handle.keys()):
            tensor = handle.get_slice(name)
            shape = tensor.get_shape()
            digest.update(f"{name}:{tensor.get_dtype()}:{shape}".encode())
            ends = [handle.get_tensor(name)] if len(shape) == 0 else [tensor[:1], tensor[-1:]]
            for end in ends:
                values = end.flatten()[:FINGERPRINT_VALUES].contiguous()
                digest.update(values.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def weights_fingerprints(folder: Path) -> dict[str, str]:
    """The fingerprint of every safetensors file under ``folder``, by path relative to it."""
    return {str(path.relative_to(folder)): weights_fingerprint(path) for path in sorted(folder.rglob("*.safetensors"))}


def check_weights(folder: Path, config: ExportConfig) -> None:
    """The weights files are the ones the export wrote (no file of another export swapped in, none missing) and
    no pickle lies among them (``vlmtrain.load`` and transformers would otherwise read one)."""
    pickle = next((path for path in sorted(folder.rglob("*")) if path.suffix.lower() in PICKLE_SUFFIXES), None)
    if pickle is not None:
        raise UserError(f"{pickle}: a pickle file in an export; vlmtrain reads safetensors only (remove it)")
    for name, expected in config.weights.items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"{path}: missing (not a complete vlmtrain export)")
        if weights_fingerprint(path) != expected:
            raise UserError(f"{path}: not the weights this export wrote (another export's, or changed since); export again")


def write_config(out: Path, config: ExportConfig) -> None:
    """Write ``vision/config.json``."""
    (out / VISION_DIR).mkdir(parents=True, exist_ok=True)
    (out / VISION_DIR / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=1))
