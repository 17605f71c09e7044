"""One resolver from a model reference to a local Hugging Face folder, and loaders built on it.

References: ``builtin:smollm2-135m``, ``builtin:minilm-l6``, ``tiny:llama``, ``tiny:bert`` (materialised once into
``model_cache()``), an existing local folder (a PEFT adapter folder resolves to its merge with its base), or
anything else shaped like a hub id (``org/name``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ray_jobs.artifact_store import ensure_local
from ray_jobs.layout import POLICY_INFO_FILE, model_cache
from ray_jobs.models import builtins, tiny
from ray_jobs.names import HUB_ID, MODEL_PREFIXES

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ray_jobs.spec import LoraSpec


class ModelNotFoundError(ValueError):
    """A model reference that names nothing loadable here."""


# Versioned folder names: changing a recipe means bumping the suffix, never reusing a stale cached folder.
_MATERIALISED: dict[str, tuple[str, Callable[[Path], None]]] = {
    "tiny:llama": ("tiny-llama-v1", tiny.build_tiny_llama),
    "tiny:bert": ("tiny-bert-v1", tiny.build_tiny_bert),
    "builtin:smollm2-135m": ("smollm2-135m-instruct", builtins.convert_smollm2),
}
# A folder holding this is a PEFT adapter, not a whole model: it resolves to its merge with its base.
ADAPTER_CONFIG = "adapter_config.json"
_NOT_A_MODEL = {"builtin:vader": "builtin:vader is an oracle, not a model: load it with ray_jobs.models.oracle"}


def known_refs() -> list[str]:
    return sorted([*_MATERIALISED, "builtin:minilm-l6"])


def materialise(name: str, build: Callable[[Path], None], cache: Path | None = None) -> Path:
    """Build a model folder once: in a temp folder, renamed into place under a file lock.

    Concurrent Ray workers asking at once wait for the first builder; a folder that exists is always complete.
    """
    from filelock import FileLock

    cache = cache or model_cache()
    target = cache / name
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / f".{name}.lock")):
        if target.is_dir():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
        try:
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache is shared by every job on the machine
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(ref: str | os.PathLike[str], cache: Path | None = None) -> Path | str:
    """Map a model reference to a local folder (Path), or return it unchanged (str) when it is a hub id.

    `cache`: where built-in and tiny models are materialised (default `model_cache()`, this process's)."""
    text = os.fspath(ref)
    if text in _MATERIALISED:
        name, build = _MATERIALISED[text]
        return materialise(name, build, cache)
    if text == "builtin:minilm-l6":
        return builtins.minilm_dir()
    if text in _NOT_A_MODEL:
        raise ModelNotFoundError(_NOT_A_MODEL[text])
    if text.startswith(MODEL_PREFIXES):
        raise ModelNotFoundError(f"unknown model {text!r}; built-in models are {', '.join(known_refs())}")
    path = Path(text).expanduser()
    ensure_local(path)  # a job's stage this node never held (a reward model, a policy) comes from the artifact root
    if (path / ADAPTER_CONFIG).is_file():
        return merged_adapter(path)
    if path.exists():
        return path
    if isinstance(ref, os.PathLike) or not HUB_ID.match(text) or text.startswith((".", "~")):
        raise ModelNotFoundError(f"model path {text!r} does not exist")
    return text


def merged_adapter(folder: Path) -> Path:
    """A PEFT adapter folder (a LoRA policy saved as an adapter) merged into its base model, as a plain folder.

    Merged once per adapter version into the model cache, so vLLM, transformers and every stage load it like any
    model. The base is the reference rmdistill.json records, else PEFT's base_model_name_or_path.
    """
    stamp = max(p.stat().st_mtime_ns for p in folder.iterdir())
    key = hashlib.sha256(f"{folder.resolve()}:{stamp}".encode()).hexdigest()[:16]
    return materialise(f"merged-{key}", lambda out: _merge_adapter(folder, out), model_cache() / "merged-policies")


def _merge_adapter(folder: Path, out: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = resolve_model_path(adapter_base(folder))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder).merge_and_unload()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder if (folder / "tokenizer_config.json").is_file() else base).save_pretrained(out)


def adapter_base(folder: Path) -> str:
    """The base model an adapter folder applies to: its rmdistill.json's, else its adapter_config.json's."""
    info = folder / POLICY_INFO_FILE
    if info.is_file():
        recorded = json.loads(info.read_text())
        for key in ("base_model", "reference"):
            if recorded.get(key):
                return str(recorded[key])
    base = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ModelNotFoundError(f"{folder}: the adapter names no base model ({ADAPTER_CONFIG}, {POLICY_INFO_FILE})")
    return str(base)


def _from_pretrained(ref: str | os.PathLike[str], loader: Callable[..., Any], **kwargs: Any) -> Any:
    """Call a from_pretrained on a resolved reference, turning 'not found / hub unreachable' into one clear error."""
    location = resolve_model_path(ref)
    try:
        return loader(location, **kwargs)
    except (OSError, ValueError) as err:  # transformers raises ValueError for a folder with no usable tokenizer
        if isinstance(location, str):
            raise ModelNotFoundError(
                f"model {location!r} is not a local path, and loading it from the Hugging Face hub failed "
                f"(the hub is unreachable or offline, HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}, "
                "or it has no such repository): "
                f"download it elsewhere and pass a local path, or use one of {', '.join(known_refs())}. ({err})"
            ) from err
        raise ModelNotFoundError(f"model folder {str(location)!r} ({ref}) could not be loaded: {err}") from err


def load_config(ref: str | os.PathLike[str]) -> Any:
    """The model's configuration alone (no weights): enough to tell what kind of model a reference names."""
    from transformers import AutoConfig

    return _from_pretrained(ref, AutoConfig.from_pretrained)


def load_tokenizer(ref: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """The model's tokenizer with a pad token always set (EOS, else UNK, doubles as padding)."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(ref, AutoTokenizer.from_pretrained)
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelNotFoundError(f"tokenizer of {ref!r} has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
    return tokenizer


def load_causal_lm(
    ref: str | os.PathLike[str], dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(ref)
    model = _from_pretrained(ref, AutoModelForCausalLM.from_pretrained, dtype=dtype).to(device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_reward_model(
    ref: str | os.PathLike[str], lora: LoraSpec | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A scalar-head reward model (num_labels=1) over an encoder or a causal LM (scored at the last real token).

    A fresh head is initialised from torch's global RNG: seed it first for reproducible members.
    """
    from transformers import AutoModelForSequenceClassification

    from ray_jobs.models.reward import is_pair_encoder

    tokenizer = load_tokenizer(ref)
    # Causal-LM heads read the rightmost token that is not pad_token_id. Where pad doubles as EOS (SmolLM2) that
    # would skip the EOS ending the response, so padding moves to another token the text never contains.
    pad_is_eos = tokenizer.pad_token_id == tokenizer.eos_token_id
    if pad_is_eos and not is_pair_encoder(tokenizer) and tokenizer.unk_token not in (None, tokenizer.eos_token):
        tokenizer.pad_token = tokenizer.unk_token
    model = _from_pretrained(
        ref,
        AutoModelForSequenceClassification.from_pretrained,
        num_labels=1,
        dtype=dtype,
        pad_token_id=tokenizer.pad_token_id,
    )
    if lora is not None:
        from peft import LoraConfig, TaskType, get_peft_model

        config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
        )
        model = get_peft_model(model, config)
    return model, tokenizer


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute activations in the backward pass (transformers' layer-wise checkpointing, non-reentrant: it needs
    no input that requires grad, so it also works under LoRA's frozen embeddings)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
