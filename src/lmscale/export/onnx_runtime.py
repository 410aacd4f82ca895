"""Running an exported folder in onnxruntime: one step with the KV cache, and greedy decoding.

Needs only onnxruntime and numpy (and the folder's config.json), not torch: this is what an
application without lmscale would write.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lmscale.errors import LmscaleError


class OnnxModel:
    """An exported decoder in an onnxruntime session.

    Args:
        folder: written by `export_onnx`.
        threads: onnxruntime's intra-op threads (None: its default).
    """

    def __init__(self, folder: str | Path, threads: int | None = None):
        import onnxruntime as ort

        folder = Path(folder)
        if not (folder / "model.onnx").is_file():
            raise LmscaleError(f"{folder} holds no model.onnx")
        config = json.loads((folder / "config.json").read_text())
        record = config["onnx"]
        self.n_layers, self.n_kv_heads = record["n_layers"], record["n_kv_heads"]
        self.head_dim = record["head_dim"]
        self.eos_token_id = config.get("eos_token_id")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.n_kv_heads, 0, self.head_dim)
        return [np.zeros(shape, np.float32) for _ in range(2 * self.n_layers)]

    def step(
        self,
        input_ids: np.ndarray,
        past: list[np.ndarray],
        attention_mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """(B, T) new ids after `past` -> (logits (B, T, vocab), present for the next step).

        attention_mask: (B, past + T), 0 for padding keys; None sees every key.
        """
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = np.ones((B, past[0].shape[2] + T), np.int64)
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask}
        for i in range(self.n_layers):
            feeds[f"past_key_values.{i}.key"] = past[2 * i]
            feeds[f"past_key_values.{i}.value"] = past[2 * i + 1]
        logits, *present = self.session.run(None, feeds)
        return logits, present

    def generate(
        self, prompt: list[int], max_new_tokens: int, stop_at_eos: bool = False
    ) -> list[int]:
        """Greedy decoding of one prompt with the KV cache; returns the new token ids."""
        logits, past = self.step(np.asarray([prompt], np.int64), self.empty_past(1))
        new: list[int] = []
        for _ in range(max_new_tokens):
            token = int(logits[0, -1].argmax())
            new.append(token)
            if stop_at_eos and token == self.eos_token_id:
                break
            if len(new) == max_new_tokens:
                break
            logits, past = self.step(np.asarray([[token]], np.int64), past)
        return new
