"""``trainer.compile``: each decoder layer of the LM compiled with ``torch.compile`` (regional compilation, as
torchtitan compiles each transformer block), with dynamic shapes, since packed steps change length every step;
vlmtrain's packed attention runs eager inside them (:func:`vlmtrain.modeling.attention.varlen_attention_forward`),
so a new length needs no recompilation (scripts/bench_compile.py counts them)."""

from __future__ import annotations

from vlmtrain.modeling.vlm import VisionLanguageModel


def compile_layers(model: VisionLanguageModel) -> int:
    """Compile each decoder layer of ``model``'s LM in place; returns how many."""
    layers = list(model.transformers_lm().get_decoder().layers)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
