"""The tokenizer a GGUF file describes, rebuilt as a Hugging Face `tokenizers.Tokenizer`.

A GGUF has no tokenizer.json: it stores the vocabulary, the merges, each token's type and the
special token ids under `tokenizer.ggml.*`, and names its pre-tokenizer (`tokenizer.ggml.pre`)
after one of llama.cpp's built-in splitting rules. Only byte-level BPE ("gpt2") is supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from lmscale.errors import LmscaleError

# llama.cpp's token types (llama_token_type): 3 is CONTROL, 4 is USER_DEFINED.
CONTROL, USER_DEFINED = 3, 4

# llama.cpp's splitting rules by `tokenizer.ggml.pre`, as the regexes run before byte-level BPE.
# The last one of each is the GPT-2 rule, which `ByteLevel(use_regex=True)` applies itself.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS: dict[str, list[str]] = {
    "default": [],
    "gpt2": [],
    # SmolLM, StarCoder, Refact: every digit on its own first (llama-vocab.cpp), then GPT-2's rule.
    "smollm": [r"\p{N}"],
    "starcoder": [r"\p{N}"],
    "refact": [r"\p{N}"],
    "llama-bpe": [_LLAMA3],
    "llama3": [_LLAMA3],
}


@dataclass
class GGUFTokenizer:
    """The tokenizer and the token settings of a GGUF file."""

    tokenizer: Tokenizer
    tokens: list[str]
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    add_bos: bool
    chat_template: str | None


def build_tokenizer(meta: dict[str, Any], path: Path) -> GGUFTokenizer:
    """Rebuild the byte-level BPE tokenizer a GGUF's metadata describes.

    Args:
        meta: every metadata field of the file, decoded to Python values.
        path: the file, for error messages.

    Returns:
        The tokenizer with its special tokens, the BOS setting and the chat template.
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise LmscaleError(
            f"{path}: tokenizer model '{kind}' is not supported (only byte-level BPE, 'gpt2')"
        )
    tokens = _string_list(meta, "tokenizer.ggml.tokens", path)
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise LmscaleError(f"{path}: 'tokenizer.ggml.tokens' lists a token twice")
    merges = _merges(_string_list(meta, "tokenizer.ggml.merges", path), vocab, path)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"), path)
    tokenizer.decoder = decoders.ByteLevel()
    _add_special_tokens(tokenizer, tokens, meta, path)
    special = {key: _special(meta, key, tokens, path) for key in ("bos", "eos", "padding")}
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    if add_bos:
        _prepend_bos(tokenizer, special["bos"], tokens, path)
    template = meta.get("tokenizer.chat_template")
    return GGUFTokenizer(
        tokenizer=tokenizer,
        tokens=tokens,
        bos_token=special["bos"],
        eos_token=special["eos"],
        pad_token=special["padding"],
        add_bos=add_bos,
        chat_template=template if isinstance(template, str) else None,
    )


def _string_list(meta: dict, key: str, path: Path) -> list[str]:
    value = meta.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise LmscaleError(f"{path}: metadata '{key}' is missing or not a list of strings")
    return value


def _merges(lines: list[str], vocab: dict[str, int], path: Path) -> list[tuple[str, str]]:
    """ "a b" lines as pairs; byte-level tokens never hold a real space, so one split suffices."""
    pairs = [tuple(line.split(" ")) for line in lines]
    for line, pair in zip(lines, pairs, strict=True):
        # NOTE: checked here because `tokenizers` panics (no Python exception) on a bad merge.
        if len(pair) != 2 or not all(piece in vocab for piece in (*pair, "".join(pair))):
            raise LmscaleError(
                f"{path}: merge {line!r} in 'tokenizer.ggml.merges' is not two known tokens "
                "making a known token"
            )
    return pairs


def _pre_tokenizer(name: str, path: Path):
    """Split by llama.cpp's rule `name`, then map bytes to the byte-level alphabet."""
    if name not in PRE_TOKENIZER_SPLITS:
        raise LmscaleError(
            f"{path}: pre-tokenizer '{name}' is not supported "
            f"(supported: {', '.join(PRE_TOKENIZER_SPLITS)})"
        )
    splits = [
        pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in PRE_TOKENIZER_SPLITS[name]
    ]
    # The GPT-2 rule runs last unless a custom rule already covered everything (Llama 3's).
    gpt2_rule = name not in ("llama-bpe", "llama3")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=gpt2_rule)
    return pre_tokenizers.Sequence([*splits, byte_level])


def _add_special_tokens(tokenizer: Tokenizer, tokens: list[str], meta: dict, path: Path) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens.

    Both are then matched whole in the text, as llama.cpp does, instead of being cut by BPE.
    """
    types = meta.get("tokenizer.ggml.token_type")
    if types is None:
        return
    if not isinstance(types, list) or len(types) != len(tokens):
        raise LmscaleError(f"{path}: 'tokenizer.ggml.token_type' does not match the token list")
    control = [t for t, kind in zip(tokens, types, strict=True) if kind == CONTROL]
    user = [t for t, kind in zip(tokens, types, strict=True) if kind == USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])


def _special(meta: dict, key: str, tokens: list[str], path: Path) -> str | None:
    """The token string behind `tokenizer.ggml.<key>_token_id`, None when the file names none."""
    token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
    if token_id is None:
        return None
    if not isinstance(token_id, int) or not 0 <= token_id < len(tokens):
        raise LmscaleError(f"{path}: 'tokenizer.ggml.{key}_token_id' {token_id!r} is not a token")
    return tokens[token_id]


def _prepend_bos(tokenizer: Tokenizer, bos: str | None, tokens: list[str], path: Path) -> None:
    if bos is None:
        raise LmscaleError(f"{path}: 'tokenizer.ggml.add_bos_token' is set but no BOS token is")
    bos_id = tokens.index(bos)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
