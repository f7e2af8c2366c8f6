"""The recipe's ``model`` section: the vision encoder, pooling, projector and language model, and their rules
(:func:`check_model`). Each kind of part is checked by its own registry entry (:mod:`vlmtrain.modeling`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlmtrain.errors import UserError
from vlmtrain.modeling.backbones import BACKBONES
from vlmtrain.modeling.errors import InvalidSetting, one_of, positive, require
from vlmtrain.modeling.geometry import Geometry
from vlmtrain.modeling.pooling import POOLINGS
from vlmtrain.modeling.projector import PROJECTORS


@dataclass
class LoraConfig:
    """LoRA adapters on the LM, the vision encoder or the projector (PEFT); ``rank`` 0 means none. With adapters, a trainable
    part trains only them. ``dora``: weight-decomposed LoRA (PEFT's ``use_dora``); ``rslora``: the update scaled
    by alpha/sqrt(rank). The vision encoder's ``target_modules`` are its own names (no default: they differ by
    tower, e.g. ``qkv``/``proj`` in the native ViT and Qwen's towers, ``q_proj``/``k_proj``/``v_proj`` in SigLIP2)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    dora: bool = False
    rslora: bool = False


@dataclass
class VisionConfig:
    """The vision encoder. ``native`` is built from the fields below (starting from the weights in ``path``, a
    .safetensors file, when given); HF backbones from a local ``path`` or from ``hf_config``."""

    backbone: str = "native"
    path: str | None = None
    hf_config: dict[str, Any] = field(default_factory=dict)
    patch_size: int | None = None
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    rope_theta: float = 100.0
    stem: str = "conv"
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(target_modules=[]))


@dataclass
class PoolingConfig:
    """pool×pool windows of patches become one visual token; ``size`` None takes the backbone's own."""

    kind: str = "average"
    size: int | None = None
    heads: int = 4


@dataclass
class ProjectorConfig:
    """From the vision width to the language model's width: ``mlp`` (LayerNorm, then a two-layer GELU MLP of
    ``hidden_size``, default the LM's width) or ``gemma4`` (Gemma 4's embedder: RMSNorm without scale, then
    one linear map without bias; no hidden size). ``lora``: LoRA adapters on its linear layers (``mlp.0``,
    ``mlp.2``; ``embedding_projection`` in Gemma 4's)."""

    kind: str = "mlp"
    hidden_size: int | None = None
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(target_modules=[]))


@dataclass
class LMConfig:
    """A Hugging Face causal LM: from a local ``path``, or random weights from ``hf_config`` (needs model_type);
    new LoRA adapters (``lora``) or the PEFT adapter folder ``adapter`` on top; ``quantization: nf4`` loads the
    folder's weights 4-bit (bitsandbytes) under the adapters: QLoRA."""

    path: str | None = None
    hf_config: dict[str, Any] | None = field(default_factory=dict)  # null clears it (a recipe switching to a path)
    tokenizer: str | None = None
    image_token: str = "<image>"
    attn_implementation: str = "vlmtrain_varlen"  # packed rows attend per sample (vlmtrain/modeling/attention.py)
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    adapter: str | None = None
    loss_chunk_tokens: int = 0  # the loss's logits a chunk of this many labelled tokens at a time (0: all at once)
    quantization: str | None = None  # "nf4": the base LM's linear layers 4-bit, frozen, under LoRA (QLoRA)

    def __post_init__(self) -> None:
        if self.hf_config is None:
            self.hf_config = {}


@dataclass
class ModelConfig:
    """The model: its parts, or ``checkpoint``, a whole VLM folder (Gemma 4, Qwen2.5-VL, Qwen3-VL) whose family fills in
    every part (tower, pooling, projector, LM, image token); keys the recipe sets itself win."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    pooling: PoolingConfig = field(default_factory=PoolingConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    checkpoint: str | None = None


def check_model(model: ModelConfig, levels: list[int]) -> None:
    """Every rule of the ``model`` section (served at budget ``levels``); raises :class:`InvalidSetting` whose key
    is relative to the section (``vision.width``)."""
    checks = (("vision", _check_vision), ("pooling", _check_pooling), ("projector", _check_projector), ("lm", _check_lm))
    for name, check in checks:
        try:
            check(model, levels)
        except InvalidSetting as problem:
            raise problem.under(name) from None


def _check_vision(model: ModelConfig, levels: list[int]) -> None:
    vision = model.vision
    one_of("backbone", vision.backbone, tuple(BACKBONES))
    if vision.patch_size is not None:
        positive("patch_size", vision.patch_size)
    BACKBONES[vision.backbone].check(vision)
    _check_lora(vision.lora)


POOLING_TOWERS = tuple(name for name, kind in BACKBONES.items() if kind.pools_itself)


def _check_lora(lora: LoraConfig) -> None:
    """The rules of a ``lora`` section (keys relative to its part's section)."""
    require(lora.rank >= 0, "lora.rank", f"must be >= 0, got {lora.rank}")
    positive("lora.alpha", lora.alpha)
    require(0 <= lora.dropout < 1, "lora.dropout", f"must be in [0, 1), got {lora.dropout}")
    require(not lora.rank or bool(lora.target_modules), "lora.target_modules", "LoRA needs at least one target module")


def _check_pooling(model: ModelConfig, levels: list[int]) -> None:
    pooling = model.pooling
    one_of("kind", pooling.kind, tuple(POOLINGS))
    backbone = model.vision.backbone
    pools_itself = BACKBONES[backbone].pools_itself
    require(
        (pooling.kind == "tower") == pools_itself,
        "kind",
        f"the {backbone} encoder pools and projects itself: set model.pooling.kind: tower and model.projector.kind: identity"
        if pools_itself else f"tower: only for an encoder that pools itself ({', '.join(POOLING_TOWERS)})",
    )
    if pooling.size is not None:
        positive("size", pooling.size)
    positive("heads", pooling.heads)
    patch_size = model.vision.patch_size
    if pooling.size is not None and patch_size is not None and patch_size > 0:
        try:
            Geometry(patch_size, pooling.size, tuple(levels))
        except InvalidSetting:
            pass  # the budget section names its own mistakes
        except UserError as error:
            raise InvalidSetting("size", str(error)) from None


def _check_projector(model: ModelConfig, levels: list[int]) -> None:
    projector = model.projector
    one_of("kind", projector.kind, tuple(PROJECTORS))
    if projector.hidden_size is not None:
        require(PROJECTORS[projector.kind].hidden_layer, "hidden_size", f"the {projector.kind} projector has no hidden layer")
        positive("hidden_size", projector.hidden_size)
    _check_lora(projector.lora)
    identity = projector.kind == "identity"
    require(not (projector.lora.rank and identity), "lora.rank", "the identity projector has no weights to adapt")


def _check_lm(model: ModelConfig, levels: list[int]) -> None:
    lm = model.lm
    require(
        lm.path is not None or bool(lm.hf_config.get("model_type")),
        "hf_config",
        "without model.lm.path it must hold a model_type (e.g. llama)",
    )
    require(
        lm.path is None or not lm.hf_config,
        "hf_config",
        "is not used when model.lm.path loads a model (its config comes from the folder); clear it: model.lm.hf_config=null",
    )
    require(bool(lm.image_token), "image_token", "must not be empty")
    require(lm.quantization in (None, "nf4"), "quantization", f"{lm.quantization!r} is not one of null, nf4")
    require(
        lm.quantization is None or (lm.path is not None and lm.lora.rank > 0),
        "quantization",
        "nf4 quantizes a pretrained LM's weights under new LoRA adapters: it needs model.lm.path and model.lm.lora.rank",
    )
    positive("loss_chunk_tokens", lm.loss_chunk_tokens, allow_zero=True)
    lora = lm.lora
    _check_lora(lora)
    require(
        not (lora.rank and lm.adapter),
        "adapter",
        "give either new LoRA adapters (model.lm.lora.rank) or an adapter folder, not both",
    )
