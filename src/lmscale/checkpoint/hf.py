"""Hugging Face model folders in and out: `config.json` + safetensors weights + tokenizer files.

    model_dir/
        config.json                      architecture and shape (see `hf_config.py`)
        model.safetensors                weights; or shards listed in model.safetensors.index.json
        generation_config.json           bos/eos ids for generation
        tokenizer.json, tokenizer_config.json, special_tokens_map.json

Safetensors only: a `pytorch_model.bin` is a pickle, which can run code when loaded. Every name,
shape and file is checked before a model is built, so a bad folder loads nothing at all.
transformers is not imported here; the tests check the results against it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from lmscale.checkpoint.hf_config import hf_config_to_model_config, model_config_to_hf_config
from lmscale.checkpoint.hf_weights import (
    IGNORED_SUFFIXES,
    from_hf_state,
    normalize_name,
    to_hf_state,
)
from lmscale.checkpoint.load import as_dtype, build_model, check_state, empty_init
from lmscale.config import read_json_object
from lmscale.errors import LmscaleError
from lmscale.model import ModelConfig, Transformer
from lmscale.tokenizer import Tokenizer

SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


def is_hf_dir(path: str | Path) -> bool:
    """Whether `path` is a Hugging Face model folder (a config.json naming a `model_type`)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    try:
        return "model_type" in json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
        return False


def load_hf(
    directory: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> tuple[Transformer, Tokenizer]:
    """A Hugging Face model folder as an lmscale model and tokenizer.

    Args:
        directory: the folder (e.g. a snapshot downloaded from the Hub).
        device: where the weights go.
        dtype: a floating dtype (or its name) to cast to; None keeps the checkpoint's dtype.

    Returns:
        (model in eval mode, tokenizer from tokenizer.json + tokenizer_config.json).
    """
    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        raise LmscaleError(f"{directory} holds no tokenizer.json")
    tokenizer = Tokenizer.load_pretrained(directory)
    return load_hf_model(directory, device=device, dtype=dtype), tokenizer


def load_hf_model(
    directory: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> Transformer:
    """The model of a Hugging Face folder, without its tokenizer (arguments as `load_hf`)."""
    directory = Path(directory)
    config = hf_config_to_model_config(_read_config(directory), str(directory / "config.json"))
    hf_state = _read_weights(directory)
    hf_state = {normalize_name(k, config): v for k, v in hf_state.items()}
    hf_state = {k: v for k, v in hf_state.items() if not k.endswith(IGNORED_SUFFIXES)}
    if config.tie_embeddings:  # some checkpoints store the tied head anyway
        hf_state.pop("lm_head.weight", None)
    _check_tensors(hf_state, config, directory)
    target = as_dtype(dtype) or next(iter(hf_state.values())).dtype
    state = {k: v.to(target) for k, v in from_hf_state(hf_state, config).items()}
    return build_model(config, state, device)


def export_hf(
    model: Transformer,
    tokenizer: Tokenizer | None,
    out_dir: str | Path,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Write `model` (and `tokenizer`) as a folder `transformers.AutoModelForCausalLM` loads.

    Args:
        model: the model; llama family exports as LlamaForCausalLM (Qwen2ForCausalLM with
            qkv_bias), gpt2 family as GPT2LMHeadModel.
        tokenizer: written with `save_pretrained`; None writes no tokenizer files.
        out_dir: the folder (created if missing; files of the same names are replaced).
        dtype: cast the weights (e.g. "bfloat16"); None keeps the model's dtype.

    Returns:
        The folder.
    """
    out_dir = Path(out_dir)
    hf_config = model_config_to_hf_config(model.config)
    tensors = to_hf_state(model.state_dict(), model.config)
    target = as_dtype(dtype) or model.tok_embeddings.weight.dtype
    tensors = {k: v.detach().to(device="cpu", dtype=target) for k, v in tensors.items()}
    hf_config["dtype"] = hf_config["torch_dtype"] = str(target).removeprefix("torch.")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / SINGLE_FILE, metadata={"format": "pt"})
    _write_json(out_dir / "config.json", _with_token_ids(hf_config, tokenizer))
    _write_json(out_dir / "generation_config.json", _generation_config(tokenizer))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def _read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise LmscaleError(f"{directory} is not a Hugging Face model folder: no config.json")
    return read_json_object(path)


def _weight_files(directory: Path) -> dict[Path, list[str] | None]:
    """Each safetensors file to read, with the names the index expects in it (None: any)."""
    if (directory / SINGLE_FILE).is_file():
        return {directory / SINGLE_FILE: None}
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise LmscaleError(f"cannot read {index}: {err}") from None
        files: dict[Path, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(directory / file, []).append(name)
        return files
    if any(directory.glob("pytorch_model*.bin")):
        raise LmscaleError(
            f"{directory} holds pytorch_model.bin (pickle) weights: only safetensors is supported; "
            "convert them or download the model.safetensors version"
        )
    raise LmscaleError(f"{directory} holds no {SINGLE_FILE} or {INDEX_FILE}")


def _read_weights(directory: Path) -> dict[str, Tensor]:
    """Every tensor of the folder, read fully now so a corrupt file fails before any model exists."""
    state: dict[str, Tensor] = {}
    for path, names in _weight_files(directory).items():
        try:
            with safe_open(path, framework="pt") as file:
                keys = list(file.keys())
                for name in names or keys:
                    if name not in keys:
                        raise LmscaleError(f"{path} lacks tensor '{name}' listed in {INDEX_FILE}")
                    state[name] = file.get_tensor(name)
        except LmscaleError:
            raise
        except FileNotFoundError:
            raise LmscaleError(f"weight file not found: {path}") from None
        except Exception as err:  # safetensors raises its own error types on corrupt files
            raise LmscaleError(f"corrupt safetensors file {path}: {err}") from None
    if not state:
        raise LmscaleError(f"{directory} holds no weights")
    return state


def _check_tensors(hf_state: dict[str, Tensor], config: ModelConfig, directory: Path) -> None:
    """Raise LmscaleError unless the names and shapes are exactly what `config` needs."""
    with empty_init():  # names and shapes only
        expected = to_hf_state(Transformer(config).state_dict(), config)
    check_state(expected, hf_state, str(directory))


def _with_token_ids(hf_config: dict, tokenizer: Tokenizer | None) -> dict:
    if tokenizer is None:
        return hf_config
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    return hf_config | ids | {"pad_token_id": tokenizer.pad_id}


def _generation_config(tokenizer: Tokenizer | None) -> dict:
    if tokenizer is None:
        return {"_from_model_config": True}
    end = tokenizer.end_of_turn_ids
    return {
        "_from_model_config": True,
        "bos_token_id": tokenizer.bos_id,
        # Chat models stop at an end-of-turn token as well as at eos; transformers takes a list.
        "eos_token_id": end[0] if len(end) == 1 else (end or None),
        "pad_token_id": tokenizer.pad_id,
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
