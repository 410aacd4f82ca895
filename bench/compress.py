"""Quantized SmolLM2-135M on the CPU: bytes on disk, perplexity, batch-1 prefill and decode speed.

Every variant is saved to a temporary folder (its model.safetensors size is the "bytes" column)
and loaded back the way `lmscale generate` loads it (float32 runs in the decode layout, see
`decode_layout_`). Perplexity: the first `--max-tokens` tokens of Hamlet (the bundled
Shakespeare, as tests/compress/test_smollm2.py), windows of `--context` tokens, as `lmscale eval`.
Speed: greedy generation of 1 token (= prefill of the prompt) and of `--new-tokens` tokens,
decode tokens/s = (new_tokens - 1) / (t_all - t_first); variants alternate over `--repeats`
rounds and medians are reported, with the ratio to float32. References: transformers'
`LlamaForCausalLM` on the same float32 weights, and llama.cpp on the bundled Q4_1 GGUF through
`llama_cpp` (llama-cpp-python) when that imports.

    python bench/compress.py --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

# bench/ is on sys.path when a script in it runs: the batch-1 timing loop is decode_cpu's.
from decode_cpu import measure  # noqa: E402

from lmscale.checkpoint import export_hf, load_pretrained, save_model_dir, smollm2_path
from lmscale.compress import QuantConfig, quantize_
from lmscale.compress.save import save_quantized
from lmscale.config import to_dict
from lmscale.data.corpus import iter_documents
from lmscale.engine import SamplingParams, generate_ids
from lmscale.model import Transformer, decode_layout_
from lmscale.train.evaluate import evaluate

MODEL = "smollm2-135m-instruct"
TEXT = "The history of the printing press begins in the fifteenth century, when "
VARIANTS: dict[str, QuantConfig | str] = {
    "float32": "float32",
    "bf16": "bfloat16",
    "int8": QuantConfig("int8"),
    "int8 +emb int8": QuantConfig("int8", embeddings="int8"),
    "int8-dynamic": QuantConfig("int8-dynamic"),
    "int4 g32": QuantConfig("int4", 32),
    "int4 g32 +emb int8": QuantConfig("int4", 32, embeddings="int8"),
    "int4 g32 +emb int4": QuantConfig("int4", 32, embeddings="int4"),
    "int4 g32 fz +emb int8": QuantConfig("int4", 32, embeddings="int8", zero_point="float"),
    "int4 g32 fz +emb int4": QuantConfig("int4", 32, embeddings="int4", zero_point="float"),
    "int4 g64 fz +emb int8": QuantConfig("int4", 64, embeddings="int8", zero_point="float"),
    "int4 g64 +emb int8": QuantConfig("int4", 64, embeddings="int8"),
}
"""fz: float zero point (a float16 group minimum, llama.cpp's Q4_1), `--zero-point float`."""

Runner = Callable[[list[int], int], list[int]]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_pretrained(MODEL)
    text = next(doc.text for doc in iter_documents("shakespeare") if doc.name == "tragedies/hamlet")
    tokens = np.asarray(tokenizer.encode(text[:200_000])[: args.max_tokens + 1])
    prompt = (tokenizer.encode(TEXT * 200, add_bos=False) * 2)[: args.prompt_tokens]
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    rows, runners = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            variant, nbytes = save_and_load(model, tokenizer, VARIANTS[name], Path(folder) / name)
            ppl = evaluate(variant, tokens, args.context).perplexity
            rows[name] = {"bytes": nbytes, "ppl": ppl}
            runners[name] = lmscale_runner(variant)
            print(f"{name}: {nbytes / 1e6:.1f} MB, perplexity {ppl:.3f}", flush=True)
        export_hf(model, None, Path(folder) / "hf")
        runners["transformers float32"] = hf_runner(Path(folder) / "hf")
    llama = llama_cpp_runner(args.threads)
    if llama is not None:
        runners["llama.cpp Q4_1"] = llama
    speeds = measure(runners, prompt, args)
    report(rows, speeds, args)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=2048, help="perplexity tokens")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--variants", default="", help=f"comma-separated subset of {list(VARIANTS)}")
    return p.parse_args()


def save_and_load(model: Transformer, tokenizer, variant, folder: Path) -> tuple[Transformer, int]:
    """Write the variant as its own folder, load it back; (model, bytes of model.safetensors)."""
    if isinstance(variant, QuantConfig):
        quantized = copy.deepcopy(model)
        quantize_(quantized, variant)
        save_quantized(quantized, tokenizer, folder)
        loaded, _ = load_pretrained(folder)
    else:
        dtype = getattr(torch, variant)
        config = {"model": to_dict(model.config), "tokenizer": tokenizer.settings}
        state = copy.deepcopy(model).to(dtype).state_dict()  # a tied head stays one tensor
        save_model_dir(folder, state, config, tokenizer.to_json())
        loaded, _ = load_pretrained(folder, dtype=dtype)
    return decode_layout_(loaded), (folder / "model.safetensors").stat().st_size


def lmscale_runner(model: Transformer) -> Runner:
    def run(prompt: list[int], n: int) -> list[int]:
        return list(generate_ids(model, prompt, SamplingParams(temperature=0, max_new_tokens=n)))

    return run


def hf_runner(folder: Path) -> Runner:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()

    @torch.inference_mode()
    def run(prompt: list[int], n: int) -> list[int]:
        ids = torch.tensor([prompt])
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
            min_new_tokens=n, pad_token_id=0,
        )  # fmt: skip
        return out[0, len(prompt) :].tolist()

    return run


# --- llama.cpp hook ------------------------------------------------------------------------------


def llama_cpp_runner(threads: int) -> Runner | None:
    """llama.cpp (via llama-cpp-python) on the bundled GGUF, or None when it is not installed."""
    try:
        import llama_cpp
    except ImportError:
        print("llama.cpp: not installed (pip install llama-cpp-python)")
        return None
    # NOTE: the package's own __init__ imports the `llm` CLI, so its folder is found by
    # lmscale's resolver (importlib's spec, no import) rather than importlib.resources.files.
    llm = llama_cpp.Llama(str(smollm2_path()), n_threads=threads, n_ctx=2048, verbose=False)

    def run(prompt: list[int], n: int) -> list[int]:
        llm.reset()
        out = []
        for token in llm.generate(prompt, temp=0.0):
            out.append(token)
            if len(out) == n:
                break
        return out

    return run


# --- measuring ------------------------------------------------------------------------------------


def report(rows: dict, speeds: dict, args) -> None:
    base_bytes = rows.get("float32", {}).get("bytes")
    base = speeds.get("float32")
    print(
        f"\nSmolLM2-135M, {args.threads} threads, prompt {args.prompt_tokens} tokens, "
        f"{args.new_tokens} new, medians of {args.repeats} interleaved rounds; perplexity on "
        f"{args.max_tokens} Hamlet tokens, context {args.context}\n"
    )
    print(
        "| variant | MB on disk | x float32 | perplexity | prefill tok/s | decode tok/s | decode x float32 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, speed in speeds.items():
        row = rows.get(name, {})
        size = f"{row['bytes'] / 1e6:.1f}" if row else "-"
        size_ratio = f"{row['bytes'] / base_bytes:.3f}" if row and base_bytes else "-"
        ppl = f"{row['ppl']:.3f}" if row else "-"
        ratio = f"{speed['decode'] / base['decode']:.2f}" if base else "-"
        print(
            f"| {name} | {size} | {size_ratio} | {ppl} | {speed['prefill']:.0f} | "
            f"{speed['decode']:.1f} | {ratio} |"
        )


if __name__ == "__main__":
    main()
