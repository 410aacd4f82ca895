"""Byte-level BPE tokenizer: a thin, typed wrapper over Hugging Face `tokenizers`.

Byte-level means every string maps to bytes first, so any text round-trips exactly:
`tok.decode(tok.encode(text)) == text`, newlines, trailing spaces and unicode included.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmscale.errors import LmscaleError
from lmscale.tokenizer.chat import render_chat
from lmscale.tokenizer.pretrained import read_settings, write_settings

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
# NOTE: the order fixes the ids: bos=0, eos=1, pad=2.
SPECIAL_TOKENS = (BOS, EOS, PAD)
# 256 single-byte tokens plus the special tokens: the smallest vocabulary that covers every text.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
# Tokens chat templates use to close a turn (ChatML, Llama 3, Phi-3, Gemma).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


class Tokenizer:
    """A byte-level BPE tokenizer and its special tokens.

    lmscale's own tokenizers have `<|bos|>`, `<|eos|>`, `<|pad|>` at ids 0, 1, 2; pretrained ones
    name theirs (SmolLM2: eos `<|im_end|>`, bos `<|im_start|>`; GPT-2: `<|endoftext|>`).

    Args:
        hf: the wrapped Hugging Face tokenizer; it must contain every special token named here.
        bos_token: the beginning-of-sequence token, or None when there is none.
        eos_token: the end-of-sequence token. None is allowed (some tokenizers lack one), but
            generation then stops only at `end_of_turn_ids` or the length limit.
        pad_token: the padding token, or None.
        chat_template: the Jinja chat template, or None.
        add_bos: whether `encode` prepends the bos token by default.
    """

    def __init__(
        self,
        hf: HFTokenizer,
        bos_token: str | None = BOS,
        eos_token: str | None = EOS,
        pad_token: str | None = PAD,
        chat_template: str | None = None,
        add_bos: bool = False,
    ) -> None:
        for token in (bos_token, eos_token, pad_token):
            if token is not None and hf.token_to_id(token) is None:
                raise LmscaleError(f"tokenizer lacks the special token {token}")
        self._hf = hf
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
        self.add_bos = add_bos and bos_token is not None

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Train a byte-level BPE tokenizer.

        Args:
            texts: the training texts (any iterable; consumed once).
            vocab_size: total vocabulary size, special tokens and the 256 bytes included.

        Returns:
            The trained tokenizer (its vocabulary may be smaller if the texts allow few merges).
        """
        if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
            raise LmscaleError(
                f"vocab_size must be an integer >= {MIN_VOCAB_SIZE} "
                f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size!r}"
            )
        hf = HFTokenizer(models.BPE())
        # No prefix space: encoding must not change the text, so decode(encode(t)) == t.
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`.

        Args:
            text: the text; special-token strings inside it become their ids.
            add_bos: prepend the bos token; None means the tokenizer's `add_bos` setting.

        Returns:
            The ids.
        """
        return self._with_bos(self._hf.encode(text, add_special_tokens=False).ids, add_bos)

    def encode_batch(self, texts: list[str], add_bos: bool | None = None) -> list[list[int]]:
        """Token ids of each text, encoded in parallel (`add_bos` as in `encode`)."""
        # encode_batch_fast (tokenizers >= 0.21) skips offset tracking: ~4x faster on long texts.
        encode = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)
        return [
            self._with_bos(e.ids, add_bos) for e in encode(list(texts), add_special_tokens=False)
        ]

    def _with_bos(self, ids: list[int], add_bos: bool | None) -> list[int]:
        add = self.add_bos if add_bos is None else add_bos
        return [self.bos_id, *ids] if add and self.bos_id is not None else ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render `messages` with this tokenizer's chat template.

        Args:
            messages: dicts with "role" and "content".
            add_generation_prompt: end with the header that opens the assistant's turn.

        Returns:
            The prompt text; encode it with `add_bos=False` (the template writes any bos itself).
        """
        if self.chat_template is None:
            raise LmscaleError("this tokenizer has no chat template")
        return render_chat(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`; special tokens appear literally unless skipped."""
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of a token string, or None when it is not in the vocabulary."""
        return self._hf.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token) if self.bos_token is not None else None

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token) if self.eos_token is not None else None

    @property
    def pad_id(self) -> int | None:
        return self.token_to_id(self.pad_token) if self.pad_token is not None else None

    @property
    def end_of_turn_ids(self) -> list[int]:
        """Ids that end a generated turn: eos, plus the chat template's end-of-turn markers."""
        ids = [] if self.eos_id is None else [self.eos_id]
        for token in END_OF_TURN_TOKENS:
            token_id = self.token_to_id(token)
            if token_id is not None and token in (self.chat_template or "") and token_id not in ids:
                ids.append(token_id)
        return ids

    def to_json(self) -> str:
        """The tokenizer as the JSON text of a Hugging Face `tokenizer.json`."""
        return self._hf.to_str()

    @classmethod
    def from_json(cls, text: str, source: str = "tokenizer JSON", **settings) -> Tokenizer:
        """Rebuild a tokenizer from `to_json()` output.

        Args:
            text: the JSON text.
            source: what to call it in error messages (e.g. the file it came from).
            **settings: constructor keywords (special tokens, chat_template, add_bos); the
                lmscale defaults when left out.

        Returns:
            The tokenizer.
        """
        try:
            hf = HFTokenizer.from_str(text)
        except Exception as err:  # tokenizers raises a bare Exception on bad input
            raise LmscaleError(f"corrupt tokenizer {source}: {err}") from None
        try:
            return cls(hf, **settings)
        except LmscaleError as err:
            raise LmscaleError(f"bad tokenizer {source}: {err}") from None

    def save(self, path: str | Path) -> None:
        """Write the tokenizer to `path` (a `tokenizer.json` file)."""
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read a tokenizer written by `save`.

        Args:
            path: the `tokenizer.json` file.

        Returns:
            The tokenizer.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise LmscaleError(f"tokenizer file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise LmscaleError(f"cannot read tokenizer file {path}: {err}") from None
        return cls.from_json(text, source=str(path))

    @property
    def settings(self) -> dict:
        """The constructor keywords beyond `hf`: special tokens, chat_template, add_bos."""
        return {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "chat_template": self.chat_template,
            "add_bos": self.add_bos,
        }

    @classmethod
    def load_pretrained(cls, directory: str | Path) -> Tokenizer:
        """Read a Hugging Face tokenizer folder (`tokenizer.json` + `tokenizer_config.json`).

        Args:
            directory: the folder, e.g. a model downloaded from the Hugging Face Hub.

        Returns:
            The tokenizer with the special tokens, bos setting and chat template the folder names.
        """
        directory = Path(directory)
        tokenizer = cls.load(directory / "tokenizer.json")
        settings = read_settings(directory, tokenizer._hf)
        try:
            return cls(tokenizer._hf, **settings)
        except LmscaleError as err:
            raise LmscaleError(f"bad tokenizer in {directory}: {err}") from None

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`.

        Args:
            directory: the folder (created if missing); `transformers.AutoTokenizer` reads it.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_settings(directory, self._hf, self.settings)
