"""A tokenizer's settings in the Hugging Face layout: `tokenizer.json` beside `tokenizer_config.json`.

    tokenizer.json            the `tokenizers` model (vocabulary, merges, added tokens)
    tokenizer_config.json     bos/eos/pad tokens, add_bos_token, chat_template
    special_tokens_map.json   the special tokens again (older readers look here)
    chat_template.jinja       newer transformers keep the template here instead

Read the way `transformers` reads them, so a checkpoint from the Hub loads with the same specials.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from lmscale.config import read_json_object
from lmscale.errors import LmscaleError

SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token")


def read_settings(directory: Path, hf: HFTokenizer) -> dict[str, Any]:
    """The `Tokenizer` keyword arguments that `directory`'s config files describe.

    Args:
        directory: a folder holding `tokenizer.json` and (optionally) `tokenizer_config.json`.
        hf: the tokenizer already read from `tokenizer.json` (to see what its post-processor adds).

    Returns:
        bos_token, eos_token, pad_token, chat_template and add_bos.
    """
    config = _read_json(directory / "tokenizer_config.json")
    special_map = _read_json(directory / "special_tokens_map.json")
    settings: dict[str, Any] = {}
    for key in SPECIAL_KEYS:
        value = config.get(key, special_map.get(key))
        settings[key] = value.get("content") if isinstance(value, dict) else value
    settings["chat_template"] = _chat_template(directory, config)
    if "add_bos_token" in config:
        settings["add_bos"] = bool(config["add_bos_token"])
    else:  # no explicit setting: transformers then leaves it to tokenizer.json's post-processor
        settings["add_bos"] = _post_processor_adds(hf, settings["bos_token"])
    return settings


def write_settings(directory: Path, hf: HFTokenizer, settings: dict[str, Any]) -> None:
    """Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`.

    Args:
        directory: the folder (must exist).
        hf: the tokenizer to write.
        settings: bos_token, eos_token, pad_token, chat_template and add_bos.
    """
    specials = {key: settings[key] for key in SPECIAL_KEYS if settings[key] is not None}
    if settings["add_bos"] and hf.post_processor is None:
        # NOTE: readers that ignore add_bos_token (older transformers) still prepend bos this way.
        hf = HFTokenizer.from_str(hf.to_str())
        bos = settings["bos_token"]
        hf.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, hf.token_to_id(bos))],
        )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": bool(settings["add_bos"]),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000_000_000_019_884_624_838_656,  # transformers' "no limit"
    }
    if settings["chat_template"] is not None:
        config["chat_template"] = settings["chat_template"]
    (directory / "tokenizer.json").write_text(hf.to_str(), encoding="utf-8")
    _write_json(directory / "tokenizer_config.json", config)
    _write_json(directory / "special_tokens_map.json", specials)


def _chat_template(directory: Path, config: dict) -> str | None:
    """The template from `chat_template.jinja`, else from the config (a string or a named list)."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(
        template, list
    ):  # [{"name": "default", "template": ...}, {"name": "tool_use"...}]
        named = {entry.get("name"): entry.get("template") for entry in template}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise LmscaleError(f"{directory / 'tokenizer_config.json'}: chat_template is not a string")
    return template


def _post_processor_adds(hf: HFTokenizer, bos: str | None) -> bool:
    """Whether encoding with special tokens puts `bos` first."""
    if bos is None or hf.post_processor is None:
        return False
    ids = hf.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == hf.token_to_id(bos)


def _read_json(path: Path) -> dict:
    """The object in an optional JSON file ({} when the file is absent)."""
    return read_json_object(path) if path.is_file() else {}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
