"""Training throughput of lmscale vs Hugging Face transformers, measured in the same run.

Both sides compute the same function: the transformers model is built from the same shape and
gets lmscale's weights copied in (the initial losses are printed as a check). Same data, same
optimizer (fused AdamW, lr 3e-4, clip 1.0), same step; the two alternate over `--repeats` rounds
and the medians are compared.

    python bench/train_throughput.py --preset shakespeare-10m --dtype bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import threading
import time

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lmscale.model import ModelConfig, Transformer, preset
from lmscale.train.loss import IGNORE_INDEX, count_targets, lm_loss_sum
from lmscale.train.optim import build_optimizer

LR, CLIP = 3e-4, 1.0


def hf_model(cfg: ModelConfig, ours: Transformer) -> torch.nn.Module:
    """The transformers twin of `ours`, holding the same weights."""
    if cfg.family == "gpt2":
        hf_cfg = GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.dim, n_layer=cfg.n_layers,
            n_head=cfg.n_heads, n_inner=cfg.hidden_dim, activation_function="gelu_new",
            layer_norm_epsilon=cfg.norm_eps, bos_token_id=None, eos_token_id=None, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa",
        )  # fmt: skip
        model = GPT2LMHeadModel(hf_cfg)
    else:
        hf_cfg = LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
            rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
            attention_bias=cfg.bias, mlp_bias=cfg.bias, attention_dropout=0.0, attn_implementation="sdpa",
        )  # fmt: skip
        model = LlamaForCausalLM(hf_cfg)
    model.load_state_dict(hf_state_dict(cfg, ours.state_dict()))
    return model


def hf_state_dict(cfg: ModelConfig, sd: dict) -> dict:
    """lmscale state_dict keys -> transformers keys (GPT-2's Conv1D stores weights transposed)."""
    out = {}
    if cfg.family == "gpt2":
        out |= {
            "transformer.wte.weight": sd["tok_embeddings.weight"],
            "transformer.wpe.weight": sd["pos_embeddings.weight"],
        }
        out |= {
            "transformer.ln_f.weight": sd["norm.weight"],
            "transformer.ln_f.bias": sd["norm.bias"],
        }
        for i in range(cfg.n_layers):
            p, h = f"layers.{i}.", f"transformer.h.{i}."
            for kind in ("weight", "bias"):
                qkv = [sd[f"{p}attention.w{x}.{kind}"] for x in "qkv"]
                out[f"{h}attn.c_attn.{kind}"] = (
                    torch.cat(qkv, 0).T if kind == "weight" else torch.cat(qkv)
                )
                for ours, theirs in (("attention.wo", "attn.c_proj"), ("feed_forward.w1", "mlp.c_fc"),
                                     ("feed_forward.w2", "mlp.c_proj")):  # fmt: skip
                    t = sd[f"{p}{ours}.{kind}"]
                    out[f"{h}{theirs}.{kind}"] = t.T if kind == "weight" else t
                out[f"{h}ln_1.{kind}"], out[f"{h}ln_2.{kind}"] = (
                    sd[f"{p}attention_norm.{kind}"],
                    sd[f"{p}ffn_norm.{kind}"],
                )
    else:
        out |= {
            "model.embed_tokens.weight": sd["tok_embeddings.weight"],
            "model.norm.weight": sd["norm.weight"],
        }
        names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
                 "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
                 "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}  # fmt: skip
        for i in range(cfg.n_layers):
            for ours, theirs in names.items():
                out[f"model.layers.{i}.{theirs}.weight"] = sd[f"layers.{i}.{ours}.weight"]
    out["lm_head.weight"] = sd["output.weight"]
    return {k: v.clone() for k, v in out.items()}


def lmscale_loss(model, tokens, targets):
    return lm_loss_sum(model, tokens, targets) / count_targets(targets)


def hf_loss(model, tokens, targets):
    return model(input_ids=tokens, labels=tokens).loss  # the HF way: it shifts the labels itself


class PeakRSS:
    """Peak resident memory above the starting level, sampled from a thread (CPU runs)."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_step(model, loss_fn, opt, dtype, device, compile_: bool):
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if dtype == "bfloat16"
        else contextlib.nullcontext()
    )

    # Compiled: the whole forward + loss, as transformers gets its loss inside its compiled model.
    forward_loss = functools.partial(loss_fn, model)
    if compile_:
        forward_loss = torch.compile(forward_loss)

    def step(tokens, targets):
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = forward_loss(tokens, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        return loss

    return step


def timed(step, tokens, targets, steps, device) -> float:
    """Tokens per second over `steps` steps."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(tokens, targets)
    sync()
    return steps * tokens.numel() / (time.perf_counter() - t0)


def peak_memory(step, tokens, targets, device) -> int:
    """Peak memory of one step in bytes, above what was in use before it (measured untimed)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(tokens, targets)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with PeakRSS() as meter:
        step(tokens, targets)
    return meter.peak - meter.base


def machine(device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                    platform.processor())  # fmt: skip
    return f"{name} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="shakespeare-10m")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model before timing")
    ap.add_argument("--repeats", type=int, default=5, help="rounds, alternating the two models")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for both (0: default)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)  # fmt: skip

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = preset(args.preset, max_seq_len=max(args.seq, preset(args.preset).max_seq_len))
    ours = Transformer(cfg).to(device)
    theirs = hf_model(cfg, ours).to(device)
    gen = torch.Generator().manual_seed(1234)
    tokens = torch.randint(cfg.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    targets = F.pad(tokens[:, 1:], (0, 1), value=IGNORE_INDEX)  # what HF's labels= path scores

    with torch.no_grad():
        l_ours, l_theirs = (
            lmscale_loss(ours, tokens, targets).item(),
            hf_loss(theirs, tokens, targets).item(),
        )
    models = {}
    for name, model, loss_fn in (
        ("lmscale", ours, lmscale_loss),
        ("transformers", theirs, hf_loss),
    ):
        model.train()
        opt = build_optimizer(model, "adamw", LR, weight_decay=0.1)
        models[name] = make_step(model, loss_fn, opt, args.dtype, device, args.compile)
    for step in models.values():
        for _ in range(args.warmup):
            step(tokens, targets)
    results = {name: {"tok_s": []} for name in models}
    for r in range(args.repeats):
        order = list(models) if r % 2 == 0 else list(models)[::-1]
        for name in order:
            results[name]["tok_s"].append(timed(models[name], tokens, targets, args.steps, device))
    for name, step in models.items():
        results[name]["peak"] = peak_memory(step, tokens, targets, device)

    n_params = (
        cfg.num_params(embeddings=False) + cfg.vocab_size * cfg.dim
    )  # output projection counts
    flops_per_token = 6 * n_params + 12 * cfg.n_layers * cfg.dim * args.seq
    summary = {"machine": machine(device), "preset": args.preset, "batch": args.batch, "seq": args.seq,
               "dtype": args.dtype, "compile": args.compile, "initial_loss": {"lmscale": l_ours, "transformers": l_theirs},
               "initial_loss_abs_diff": abs(l_ours - l_theirs)}  # fmt: skip
    for name, res in results.items():
        med = statistics.median(res["tok_s"])
        summary[name] = {
            "tok_s_median": med,
            "tok_s_all": res["tok_s"],
            "peak_mem_mib": res["peak"] / 2**20,
        }
        if device.type == "cuda":
            summary[name]["mfu"] = med * flops_per_token / 989e12
    summary["ratio"] = summary["lmscale"]["tok_s_median"] / summary["transformers"]["tok_s_median"]
    # Each round runs both models back to back, so the per-round ratio is less exposed to load drift.
    pairs = zip(results["lmscale"]["tok_s"], results["transformers"]["tok_s"], strict=True)
    summary["ratio_paired_median"] = statistics.median(a / b for a, b in pairs)
    if args.json:
        print(json.dumps(summary))
        return
    print(f"machine: {summary['machine']}")
    print(f"{args.preset}  batch {args.batch}x{args.seq}  {args.dtype}  {'compiled' if args.compile else 'eager'}  "
          f"{args.repeats} rounds x {args.steps} steps")  # fmt: skip
    print(
        f"initial loss: lmscale {l_ours:.6f}  transformers {l_theirs:.6f}  |diff| {abs(l_ours - l_theirs):.2e}"
    )
    mem = "peak RSS delta MiB" if device.type == "cpu" else "peak alloc MiB"
    print(f"{'':14}{'tok/s (median)':>16}{mem:>22}" + ("     MFU" if device.type == "cuda" else ""))
    for name in models:
        s = summary[name]
        mfu = f"{s['mfu']:8.1%}" if "mfu" in s else ""
        print(f"{name:14}{s['tok_s_median']:16,.0f}{s['peak_mem_mib']:22,.0f}{mfu}")
    print(f"ratio lmscale/transformers: {summary['ratio']:.2f}x (of medians), "
          f"{summary['ratio_paired_median']:.2f}x (median of per-round ratios)")  # fmt: skip


if __name__ == "__main__":
    main()
