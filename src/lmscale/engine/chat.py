"""Multi-turn chat: a history of messages, rendered with the model's chat template each turn.

Each turn renders the whole history, so the prompt of turn n+1 starts with the prompt and reply
of turn n. The KV cache is kept across turns and only the tokens after the longest common prefix
with what it already holds are fed to the model (prefix reuse):

    cached:  [system, user 1, assistant 1 .............]
    prompt:  [system, user 1, assistant 1, <|im_end|>, user 2, assistant header]
              \\______ reused from the cache ______/  \\___ prefilled this turn ___/
"""

from __future__ import annotations

from collections.abc import Iterator

from lmscale.engine.decode_step import DecodeStep
from lmscale.engine.generate import continue_ids, stream_text
from lmscale.engine.sampling import SamplingParams
from lmscale.errors import LmscaleError
from lmscale.model import KVCache, Transformer
from lmscale.tokenizer import Tokenizer


class ChatSession:
    """A conversation with a chat model: holds the messages and the KV cache between turns.

    Args:
        model: a model in eval mode.
        tokenizer: its tokenizer, which must have a chat template.
        params: sampling parameters of every reply (`max_new_tokens` caps each reply).
        system: an optional system message that starts (and survives `reset` in) the history.
        step: a compiled decode step of `model` (see `DecodeStep`); None decodes eagerly.
    """

    def __init__(
        self, model: Transformer, tokenizer: Tokenizer, params: SamplingParams,
        system: str | None = None, step: DecodeStep | None = None,
    ):  # fmt: skip
        if tokenizer.chat_template is None:
            raise LmscaleError("this model has no chat template, so it cannot chat")
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.system, self.step = system, step
        self.messages: list[dict[str, str]] = []
        self.cache: KVCache | None = None
        self.cached_ids: list[int] = []  # the tokens whose keys and values the cache holds
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cached_ids = []
        if self.cache is not None:
            self.cache.reset()

    def prompt_ids(self) -> list[int]:
        """The token ids of the history, rendered with the template and an open assistant turn."""
        text = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_bos=False)  # the template writes any bos itself

    def reply(self, text: str) -> Iterator[str]:
        """Add a user message and stream the assistant's reply as text pieces.

        The reply joins the history once the stream is exhausted; it ends at the template's
        end-of-turn token, at `params.max_new_tokens` or at the model's context length.

        Args:
            text: the user's message.

        Yields:
            Pieces of the reply's text as they are generated.
        """
        self.messages.append({"role": "user", "content": text})
        prompt = self.prompt_ids()
        limit = self.model.config.max_seq_len
        if len(prompt) >= limit:
            self.messages.pop()
            raise LmscaleError(f"the conversation ({len(prompt)} tokens) fills the context")
        budget = min(self.params.max_new_tokens, limit - len(prompt))
        reused = self._reuse_prefix(prompt, len(prompt) + budget)
        generated: list[int] = []
        ids = continue_ids(
            self.model, self.cache, prompt[reused:], self.params, budget,
            self.tokenizer.end_of_turn_ids, self.step,
        )  # fmt: skip
        pieces = []
        for piece in stream_text(_recorded(ids, generated), self.tokenizer.decode):
            pieces.append(piece)
            yield piece
        self.cached_ids = (prompt + generated)[: self.cache.length]
        self.messages.append({"role": "assistant", "content": "".join(pieces)})

    def _reuse_prefix(self, prompt: list[int], needed: int) -> int:
        """Keep the cached prefix shared with `prompt` (at most all but its last token).

        Returns:
            How many leading prompt tokens are already in the cache.
        """
        shared = 0
        for cached, new in zip(self.cached_ids, prompt[:-1], strict=False):
            if cached != new:
                break
            shared += 1
        self._ensure_capacity(needed, keep=shared)
        # NOTE: the cache is contiguous, so dropping a suffix is only moving its length back;
        # the stale positions are overwritten before anything attends to them.
        self.cache.length = shared
        return shared

    def _ensure_capacity(self, needed: int, keep: int) -> None:
        """Make the cache hold `needed` positions, copying the first `keep` into a larger one."""
        if self.cache is not None and self.cache.max_len >= needed:
            return
        # NOTE: grow geometrically so a long chat reallocates a few times, not every turn.
        grown = 2 * self.cache.max_len if self.cache is not None else 512
        size = min(self.model.config.max_seq_len, max(needed, grown))
        bigger = self.model.new_cache(1, size)
        if self.cache is not None and keep:
            bigger.k[:, :, :, :keep] = self.cache.k[:, :, :, :keep]
            bigger.v[:, :, :, :keep] = self.cache.v[:, :, :, :keep]
        self.cache = bigger


def _recorded(ids: Iterator[int], record: list[int]) -> Iterator[int]:
    """Pass `ids` through, appending each to `record`."""
    for token in ids:
        record.append(token)
        yield token
