"""The `lmscale` command: a table from verb to a thin function that calls the library.

A user's mistake (missing file, unknown preset, bad value) prints one line and exits 2.
Heavy modules are imported inside each verb, so `lmscale --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lmscale.cli.chat import chat, chat_args
from lmscale.cli.federate import federate, federate_args
from lmscale.cli.generate import generate, generate_args
from lmscale.cli.model_options import keep_quantized_arg
from lmscale.cli.plan import plan, plan_args
from lmscale.cli.report import report as run_report
from lmscale.cli.report import report_args as run_report_args
from lmscale.cli.scaling import scaling, scaling_args
from lmscale.cli.serve import serve, serve_args
from lmscale.errors import LmscaleError

EXIT_USER_ERROR = 2
EXIT_BROKEN_PIPE = 141
"""128 + SIGPIPE: what a shell reports for a tool whose reader went away."""


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (argparse itself prints the usage first)."""

    epilog_factory: Callable[[], str] | None = None
    """Builds the epilog when help is shown (it may import torch; plain parsing must not)."""

    def error(self, message: str):
        raise LmscaleError(f"{self.prog}: {message}")

    def format_help(self) -> str:
        if self.epilog_factory is not None:
            self.epilog = self.epilog_factory()
        return super().format_help()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if not getattr(args, "accepts_overrides", False) and extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        code = args.run(args, extra) or 0
        sys.stdout.flush()  # inside the try: a reader that has gone is handled below
        return code
    except BrokenPipeError:
        # The reader stopped early (`lmscale plan ... | head`): end quietly, as Unix tools do,
        # with stdout pointed at /dev/null so the interpreter's last flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except LmscaleError as error:
        print(f"lmscale: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("lmscale: interrupted", file=sys.stderr)
        return 130


def build_parser() -> Parser:
    parser = Parser(
        prog="lmscale", description="Train, evaluate and run Transformer language models."
    )
    verbs = parser.add_subparsers(title="verbs", metavar="VERB", required=True)
    for name, (add_args, run, help_text) in VERBS.items():
        sub = verbs.add_parser(name, help=help_text, description=help_text)
        add_args(sub)
        sub.set_defaults(run=run)
    return parser


# --- prepare ---------------------------------------------------------------------------------


def prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--corpus",
        required=True,
        help="'shakespeare', a text file, a folder of text files, or JSONL with a 'text' field",
    )
    p.add_argument(
        "--out", required=True, help="folder to write shards, tokenizer.json and manifest.json into"
    )
    p.add_argument(
        "--vocab-size", type=int, default=4096, help="BPE vocabulary size (default 4096)"
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.1, help="share of documents held out for validation"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--json", action="store_true", help="print the manifest summary as JSON")


def prepare(args: argparse.Namespace, _: list[str]) -> None:
    from lmscale.data import prepare as prepare_corpus

    start = time.perf_counter()
    manifest = prepare_corpus(args.corpus, args.out, args.vocab_size, args.val_fraction, args.seed)
    summary = {"out": args.out, "vocab_size": manifest.vocab_size, "dtype": manifest.dtype}
    summary |= {f"{name}_tokens": split.tokens for name, split in manifest.splits.items()}
    if args.json:
        print(json.dumps(summary))
        return
    print(
        f"prepared {args.corpus} in {time.perf_counter() - start:.1f}s: "
        f"{summary['train_tokens']:,} train and {summary['val_tokens']:,} val tokens "
        f"({manifest.dtype}, vocab {manifest.vocab_size}) -> {args.out}"
    )


# --- train -----------------------------------------------------------------------------------


def train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML run config (configs/NAME.toml); optional with --resume")
    p.add_argument("--out", help="run directory (default runs/CONFIG-DATE-TIME)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its latest checkpoint"
    )
    p.add_argument(
        "--sample-tokens",
        type=int,
        default=120,
        help="tokens of the sample printed at the end (0: none)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    p.add_argument(
        "--nproc",
        type=int,
        help="train on N processes of this machine (starts torchrun; see --parallel.strategy)",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="with --nproc: restart the group this often after a worker dies (it resumes)",
    )
    p.epilog_factory = _config_help
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.set_defaults(accepts_overrides=True)


def _config_help() -> str:
    """Every config field, so that `lmscale train --help` lists all there is to set."""
    from lmscale.config import describe_options
    from lmscale.model import ModelConfig
    from lmscale.parallel import ParallelConfig
    from lmscale.train.config import DataConfig, TrainConfig

    lines = ["config fields (in the TOML file, or on the command line as --section.field VALUE):"]
    lines.append("  [model] preset = NAME picks a shape; the model fields below replace its values")
    sections = (
        ("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig),
        ("parallel", ParallelConfig),
    )  # fmt: skip
    for section, cls in sections:
        lines += describe_options(section, cls, cls())
    return "\n".join(lines)


def train(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmscale.train import load_run_config, resume_config
    from lmscale.train import train as run_training

    if args.resume and not args.out:
        raise LmscaleError("--resume needs --out RUN_DIR")
    if args.resume and not args.config:
        config = resume_config(args.out, overrides)
    elif args.config:
        config = load_run_config(args.config, overrides)
    else:
        raise LmscaleError("--config is required (or --resume --out RUN_DIR)")
    if args.out is None and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise LmscaleError("--out is required under torchrun: every rank must name the same run")
    out = args.out or f"runs/{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.nproc is not None:
        from lmscale.parallel.parallelize import check_plan

        check_plan(config.parallel, config.model, args.nproc)
        _launch_training(args, out, overrides)
        return
    summary = run_training(
        config, out, resume=args.resume, progress=not args.no_progress and not args.json
    )
    if not summary.is_main:  # rank 0 of a distributed run reports for all
        return
    result = summary.as_dict()
    sample = _sample_from(summary.checkpoint, args.sample_tokens) if summary.checkpoint else ""
    if args.json:
        print(json.dumps(result | {"sample": sample}))
        return
    print(
        f"run: {summary.run_dir} ({summary.steps} steps, {summary.tokens_per_s:,.0f} tokens/s median)"
    )
    if summary.val and summary.unigram:
        print(f"val loss {summary.val.loss:.4f} | val perplexity {summary.val.perplexity:.2f}")
        print(
            f"unigram val loss {summary.unigram.loss:.4f} | unigram val perplexity {summary.unigram.perplexity:.2f}"
        )
    if summary.checkpoint:
        print(f"checkpoint: {summary.checkpoint}")
    if sample:
        print("sample:\n" + sample)


def _launch_training(args: argparse.Namespace, out: str, overrides: list[str]) -> None:
    """Run this same `train` command on `--nproc` processes through torchrun."""
    from lmscale.parallel.launch import launch

    train_args = ["--out", out, "--sample-tokens", str(args.sample_tokens)]
    train_args += ["--config", args.config] if args.config else []
    flags = {"--resume": args.resume, "--no-progress": args.no_progress, "--json": args.json}
    train_args += [flag for flag, on in flags.items() if on]
    code = launch(args.nproc, train_args + overrides, args.max_restarts)
    if code:
        raise LmscaleError(
            f"distributed training failed (torchrun exit code {code}); the failing rank's "
            "error is above"
        )


def _sample_from(checkpoint: Path, n_tokens: int) -> str:
    """A short sample started from a document boundary, as a first look at what was learnt."""
    if n_tokens <= 0:
        return ""
    from lmscale.checkpoint import load_pretrained
    from lmscale.engine import SamplingParams, generate_ids

    model, tokenizer = load_pretrained(str(checkpoint))
    params = SamplingParams(temperature=0.8, top_k=50, max_new_tokens=n_tokens, seed=0)
    ids = list(generate_ids(model, [tokenizer.eos_id], params, stop_ids=[tokenizer.eos_id]))
    return tokenizer.decode(ids)


# --- eval ------------------------------------------------------------------------------------


def eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a bundled name, .gguf, HF folder or run dir")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="a prepared data folder (see `lmscale prepare`)")
    source.add_argument("--text", help="a text file, tokenized with the model's tokenizer")
    p.add_argument("--split", default="val", help="split of --data to score (default val)")
    p.add_argument(
        "--context",
        type=int,
        default=1024,
        help="window length in tokens (capped at the model's maximum)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    keep_quantized_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.epilog = (
        "Definition: the text is tokenized once and cut into non-overlapping windows of --context "
        "tokens; every token of a window but its first is scored; perplexity = exp(mean NLL)."
    )


def evaluate(args: argparse.Namespace, _: list[str]) -> None:
    from lmscale.checkpoint import load_pretrained
    from lmscale.train.evaluate import evaluate as evaluate_tokens
    from lmscale.train.precision import resolve_device

    if args.context < 2 or args.batch_size < 1:
        raise LmscaleError("--context must be at least 2 and --batch-size at least 1")
    model, tokenizer = load_pretrained(
        args.model, resolve_device(args.device), keep_quantized=args.keep_quantized
    )
    tokens = _eval_tokens(args, tokenizer)
    context = min(args.context, model.config.max_seq_len)
    result = evaluate_tokens(model, tokens, context, args.batch_size)
    if args.json:
        print(json.dumps(result.as_dict() | {"context": context}))
        return
    print(f"scored tokens: {result.tokens:,} (windows of {context})")
    print(f"loss: {result.loss:.6f}")
    print(f"perplexity: {result.perplexity:.4f}")


def _eval_tokens(args: argparse.Namespace, tokenizer):
    import numpy as np

    from lmscale.data import TokenDataset

    if args.text:
        path = Path(args.text)
        if not path.is_file():
            raise LmscaleError(f"text file not found: {path}")
        return np.asarray(tokenizer.encode(path.read_text()), dtype=np.int64)
    dataset = TokenDataset(args.data, args.split)
    if json.loads(Path(dataset.tokenizer_path).read_text()) != json.loads(tokenizer.to_json()):
        raise LmscaleError(f"{args.data} was tokenized with another tokenizer than the model's")
    return dataset.tokens


# --- export ----------------------------------------------------------------------------------

EXPORT_FORMATS = ("hf", "native", "onnx")


def export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "format",
        help="hf (a Hugging Face transformers folder), native (one lmscale safetensors folder,"
        " e.g. the gathered weights of a distributed run) or onnx (onnxruntime, KV cache)",
    )
    p.add_argument("--model", required=True, help="a bundled name, .gguf, HF folder or run dir")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument(
        "--dtype", default=None, help="float32, bfloat16 or float16 (default: the model's)"
    )
    p.add_argument("--opset", type=int, default=18, help="onnx: the ONNX opset (default 18)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def export(args: argparse.Namespace, _: list[str]) -> None:
    from lmscale.checkpoint import export_hf, load_pretrained

    if args.format not in EXPORT_FORMATS:
        raise LmscaleError(
            f"unknown export format '{args.format}' (choose from {', '.join(EXPORT_FORMATS)})"
        )
    if args.dtype not in (None, "float32", "bfloat16", "float16"):
        raise LmscaleError(f"--dtype must be float32, bfloat16 or float16, got '{args.dtype}'")
    if args.format == "onnx":
        return _export_onnx(args)
    model, tokenizer = load_pretrained(args.model)
    from lmscale.compress.quantize import quantization_of

    if quantization_of(model) is not None:
        raise LmscaleError(
            f"{args.model} is quantized: export writes float models; export the model it was "
            "quantized from (its folder already is a native model)"
        )
    if args.format == "native":
        out = _export_native(model, tokenizer, args.out, args.dtype)
    else:
        out = export_hf(model, tokenizer, args.out, dtype=args.dtype)
    if args.json:
        print(json.dumps({"format": args.format, "out": str(out), "model": args.model}))
        return
    print(out)


def _export_onnx(args: argparse.Namespace) -> None:
    from lmscale.export.onnx import check_out_dir, export_onnx, require_onnx, verify_onnx

    require_onnx()
    check_out_dir(args.out, args.opset)
    if args.dtype not in (None, "float32"):
        raise LmscaleError("export onnx writes float32 (and quantized layers as integers)")
    from lmscale.checkpoint import load_pretrained

    model, tokenizer = load_pretrained(args.model, dtype="float32")
    out = export_onnx(model, tokenizer, args.out, opset=args.opset)
    check = verify_onnx(model, out)
    worst = max(check.values())
    if worst > 1e-3:
        raise LmscaleError(f"onnxruntime's logits differ from lmscale's by {worst:.2g} (> 1e-3)")
    if args.json:
        print(json.dumps({"format": "onnx", "out": str(out), "model": args.model} | check))
        return
    print(f"onnxruntime vs lmscale logits: max abs diff {worst:.2g}", file=sys.stderr)
    print(out)


def _export_native(model, tokenizer, out: str, dtype: str | None) -> Path:
    import torch

    from lmscale.checkpoint import save_model_dir
    from lmscale.config import to_dict

    state = model.state_dict()
    if dtype is not None:
        state = {
            k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in state.items()
        }
    config = {"model": to_dict(model.config), "tokenizer": tokenizer.settings}
    return save_model_dir(out, state, config, tokenizer.to_json())


# --- quantize --------------------------------------------------------------------------------


def quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a bundled name, .gguf, HF folder or run dir")
    p.add_argument(
        "--method", required=True,
        help="int8 (per output channel), int8-dynamic (int8 weights and activations) or int4 "
        "(group-wise)",
    )  # fmt: skip
    p.add_argument(
        "--group-size", type=int, default=None, help="int4: 32, 64 or 128 columns (default 32)"
    )
    p.add_argument(
        "--embeddings", default=None,
        help="the token embedding and output head: float, int8 or int4 (default: "
        f"{DEFAULT_EMBEDDINGS['int8']} for int8 methods, {DEFAULT_EMBEDDINGS['int4']} for int4)",
    )  # fmt: skip
    p.add_argument(
        "--zero-point", default="int",
        help="int4: int (an integer zero point per group, default) or float (a float16 group "
        "minimum, llama.cpp's Q4_1: w = q * scale + min)",
    )  # fmt: skip
    p.add_argument(
        "--calibrate", default=None,
        help="gptq: choose the int4 integers on calibration text (default: round to nearest)",
    )  # fmt: skip
    p.add_argument(
        "--calibration", default=None,
        help="--calibrate: a corpus (text file, folder, .jsonl; default: the bundled Shakespeare "
        "without Hamlet) sampled at seeded random places",
    )  # fmt: skip
    p.add_argument(
        "--calibration-samples", type=int, default=128, help="--calibrate: sequences (128)"
    )
    p.add_argument(
        "--calibration-length", type=int, default=512, help="--calibrate: tokens each (512)"
    )
    p.add_argument(
        "--act-order", action="store_true",
        help="--calibrate gptq: quantize columns by decreasing activation energy",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="folder to write (a native model folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.epilog = (
        "Weight-only: the linear layers of the Transformer blocks become integers, and "
        "(--embeddings) the embedding table with the output head it is tied to. Round-to-nearest "
        "by default; --calibrate gptq (int4) corrects each layer's rounding error on calibration "
        "text. generate, chat, eval and serve load the folder."
    )


DEFAULT_EMBEDDINGS = {"int8": "int8", "int8-dynamic": "int8", "int4": "int8"}
"""--embeddings when not given, by method, from bench/compress.py on SmolLM2 (2,048 Hamlet
tokens): int8 tables cost +0.5% perplexity and shrink int8 220 -> 135 MB, int4 g32 175 -> 90 MB;
an int4 table reaches 80 MB (0.30x bf16) but costs +11% perplexity, so it is opt-in. (llama.cpp
keeps SmolLM2's Q4_1 table at Q8_0 likewise.)"""


def quantize(args: argparse.Namespace, _: list[str]) -> None:
    from lmscale.compress import QuantConfig, quantize_model
    from lmscale.compress.gptq import GptqConfig, check_calibrate

    embeddings = args.embeddings or DEFAULT_EMBEDDINGS.get(args.method, "float")
    config = QuantConfig(args.method, args.group_size, embeddings, args.zero_point)
    gptq = None
    if args.calibrate is None:
        if args.calibration is not None or args.act_order:
            raise LmscaleError("--calibration and --act-order apply with --calibrate gptq only")
    else:
        check_calibrate(config, args.calibrate)
        gptq = GptqConfig(
            args.calibration_samples, args.calibration_length, args.calibration or "shakespeare",
            act_order=args.act_order,
        )  # fmt: skip
    result = quantize_model(args.model, config, args.out, gptq)
    if args.json:
        print(json.dumps(result.as_dict()))
        return
    group = f" (group size {result.group_size})" if result.group_size else ""
    group += ", float zero point" if args.zero_point == "float" else ""
    group += ", GPTQ" if result.calibration else ""
    print(
        f"{result.method}{group}: {result.modules} linear layers quantized, "
        f"{result.embeddings} embeddings -> {result.out} "
        f"({result.bytes / 1e6:.1f} MB; {result.float_bytes / 1e6:.1f} MB in float)"
    )


# --- prune -----------------------------------------------------------------------------------


def prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a bundled name, .gguf, HF folder or run dir")
    p.add_argument(
        "--method", required=True, help="magnitude (unstructured), 2:4, or structured (heads+MLP)"
    )
    p.add_argument("--sparsity", type=float, required=True, help="fraction to remove, in (0, 1)")
    p.add_argument(
        "--scope", default="global", help="magnitude: one threshold (global) or one per layer"
    )
    p.add_argument(
        "--importance", default="activation", help="structured: activation (default) or weight"
    )
    p.add_argument(
        "--calibration", default="shakespeare",
        help="structured: the corpus whose first 2048 tokens score units (a text file, folder, "
        ".jsonl; default: the bundled Shakespeare)",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="folder to write (a native float model folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--recover-steps", type=int, default=0,
        help="then fine-tune the pruned model this many steps: OUT becomes the run directory "
        "(the pruned model in OUT/pruned); further --train.X VALUE overrides apply",
    )  # fmt: skip
    p.add_argument("--recover-data", default="shakespeare", help="a prepared folder or corpus")
    p.add_argument("--recover-lr", type=float, default=1e-4, help="peak learning rate")
    p.add_argument("--recover-distill", action="store_true", help="distill from the unpruned model")
    p.set_defaults(accepts_overrides=True)
    p.epilog = (
        "magnitude and 2:4 zero weights of the block linears in place (same shapes, a float "
        "folder); structured removes the least important head groups and MLP channels of every "
        "block, giving a smaller dense model. generate, chat, eval and serve load the folder."
    )


def prune(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmscale.compress import PruneConfig, prune_model

    config = PruneConfig(args.method, args.sparsity, args.scope, args.importance)
    if overrides and not args.recover_steps:
        raise LmscaleError(f"unrecognized arguments: {' '.join(overrides)}")
    pruned = Path(args.out) / "pruned" if args.recover_steps else args.out
    if args.recover_steps and Path(args.out).exists():
        raise LmscaleError(f"{args.out} already exists: choose a new --out")
    result = prune_model(args.model, config, pruned, calibration=args.calibration)
    recovered = _recover(args, config, overrides) if args.recover_steps else None
    if args.json:
        print(json.dumps(result.as_dict() | {"recovery": recovered and recovered.as_dict()}))
        return
    pruning = result.pruning
    shape = ""
    if config.method == "structured":
        before, after = pruning["before"], pruning["after"]
        shape = "; ".join(f"{k} {before[k]} -> {after[k]}" for k in before) + "; "
    print(
        f"{config.method} at {config.sparsity}: {shape}{pruning['achieved']:.1%} of the block "
        f"weights removed -> {result.out} ({result.params / 1e6:.1f}M parameters, "
        f"{result.source_params / 1e6:.1f}M before)"
    )
    if recovered:
        print(
            f"recovery ({args.recover_steps} steps): val ppl {recovered.before.perplexity:.2f} -> "
            f"{recovered.after.val.perplexity:.2f}; run: {args.out}"
        )


def _recover(args: argparse.Namespace, config, overrides: list[str]):
    from lmscale.compress.distill import recover

    return recover(
        Path(args.out) / "pruned", args.out, args.recover_data, args.recover_steps,
        args.recover_lr, teacher=args.model if args.recover_distill else None,
        keep_zeros=config.method != "structured", overrides=overrides, progress=not args.json,
    )  # fmt: skip


# --- distill ---------------------------------------------------------------------------------


def distill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="a bundled name, .gguf, HF folder or run dir")
    p.add_argument("--student-config", required=True, help="TOML run config of the student")
    p.add_argument(
        "--data", required=True,
        help="a prepared folder or a corpus; prepared with the teacher's tokenizer into OUT/data "
        "unless it already uses it",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="the student's run directory")
    p.add_argument("--temperature", type=float, help="softens both distributions (default 2.0)")
    p.add_argument("--alpha", type=float, help="weight of the KL term vs cross-entropy (0.5)")
    p.add_argument(
        "--baseline", action="store_true",
        help="also train the student without the teacher (same steps, seed, data) into "
        "OUT/baseline and compare",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.epilog = "Further --section.field VALUE overrides apply to the student (and the baseline)."
    p.set_defaults(accepts_overrides=True)


def distill(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmscale.compress.distill import distill as run_distill

    flags = {"temperature": args.temperature, "alpha": args.alpha}
    overrides = [*overrides] + [
        item for name, value in flags.items() if value is not None
        for item in (f"--distill.{name}", str(value))
    ]  # fmt: skip
    result = run_distill(
        args.teacher, args.student_config, args.data, args.out, overrides, args.baseline,
        progress=not args.no_progress and not args.json,
    )  # fmt: skip
    if args.json:
        print(json.dumps(result.as_dict()))
        return
    rows = [("teacher", args.teacher, result.teacher.loss, result.teacher.perplexity)]
    for name, run in (("student", result.student), ("baseline", result.baseline)):
        if run is not None:
            rows.append((name, str(run.run_dir), run.val.loss, run.val.perplexity))
    print(f"{'model':<10} {'val loss':>9} {'val ppl':>9}  where")
    for name, where, loss, ppl in rows:
        print(f"{name:<10} {loss:>9.4f} {ppl:>9.2f}  {where}")


# --- compress-report -------------------------------------------------------------------------


def report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a bundled name, .gguf, HF folder or run dir")
    p.add_argument("--text", required=True, help="held-out text file to score every variant on")
    p.add_argument("--context", type=int, default=256, help="window length in tokens")
    p.add_argument(
        "--max-tokens", type=int, default=2048,
        help="score this many tokens; structured pruning calibrates on the text after them",
    )  # fmt: skip
    p.add_argument(
        "--add", action="append", default=[], metavar="NAME=DIR",
        help="also score a saved model (distilled, GPTQ, pruned + recovered, ...); repeatable",
    )  # fmt: skip
    p.add_argument(
        "--variants", help="comma-separated rows to build (default: all); e.g. float32,int8",
    )  # fmt: skip
    p.add_argument("--no-speed", action="store_true", help="skip peak RAM and speed (faster)")
    p.add_argument("--decode-tokens", type=int, default=32, help="greedy tokens timed per row")
    p.add_argument("--threads", type=int, help="torch threads for the speed runs")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--png", help="also plot perplexity against size and speed (needs matplotlib)")
    p.epilog = (
        "Variants built in memory from the float model: float32, bfloat16, int8, int4 g32 (RTN), "
        "structured 25%%, plus every --add. KL is mean KL(original || variant) of next-token "
        "distributions. Peak RAM, prompt and decode tok/s (batch 1) are measured by loading each "
        "variant, saved to a temporary folder, in a fresh process."
    )


def compress_report(args: argparse.Namespace, _: list[str]) -> None:
    from lmscale.checkpoint import load_pretrained
    from lmscale.compress import DEFAULT_VARIANTS, Variant
    from lmscale.compress import compress_report as build_report
    from lmscale.compress.report import markdown_table, plot_report

    if args.context < 2 or args.max_tokens < 1 or args.decode_tokens < 1:
        raise LmscaleError("--context must be at least 2, --max-tokens and --decode-tokens >= 1")
    path = Path(args.text)
    if not path.is_file():
        raise LmscaleError(f"text file not found: {path}")
    variants = list(DEFAULT_VARIANTS)
    if args.variants:
        known = {variant.name: variant for variant in DEFAULT_VARIANTS}
        wanted = [name.strip() for name in args.variants.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in known]
        if unknown:
            raise LmscaleError(f"unknown variant '{unknown[0]}' (choose from {', '.join(known)})")
        variants = [known[name] for name in wanted]
    for added in args.add:
        name, sep, directory = added.partition("=")
        if not sep or not name or not directory:
            raise LmscaleError(f"--add takes NAME=DIR, got '{added}'")
        if not Path(directory).exists():
            raise LmscaleError(f"--add {name}: model not found: {directory}")
        variants.append(Variant(name, path=directory))
    model, tokenizer = load_pretrained(args.model, dtype="float32")
    tokens = tokenizer.encode(path.read_text())
    context = min(args.context, model.config.max_seq_len)
    speed = {"decode_tokens": args.decode_tokens, "threads": args.threads}
    rows = build_report(
        model, tokens, context, variants, max_tokens=args.max_tokens,
        tokenizer=None if args.no_speed else tokenizer, speed=speed,
    )  # fmt: skip
    if args.png:
        plot_report(rows, args.png)
    if args.json:
        print(json.dumps({"context": context, "rows": [row.as_dict() for row in rows]}))
        return
    print(markdown_table(rows))


# --- finetune, merge -------------------------------------------------------------------------


def finetune_args(p: argparse.ArgumentParser) -> None:
    kinds = p.add_subparsers(title="kinds", metavar="KIND", required=True)
    lora = kinds.add_parser("lora", help="train a LoRA / QLoRA adapter on chat JSONL")
    lora.set_defaults(run=finetune_lora)
    lora.add_argument("--model", default="smollm2-135m-instruct", help="the base model")
    lora.add_argument(
        "--data", required=True, help='JSONL of {"messages": [...]}, or shakespeare-speakers'
    )
    lora.add_argument("--out", required=True, help="adapter folder to write")
    lora.add_argument("--rank", type=int, default=8)
    lora.add_argument("--alpha", type=float, default=16.0)
    lora.add_argument("--dropout", type=float, default=0.0)
    lora.add_argument(
        "--targets", default="q,k,v,o", help="q,k,v,o,gate,up,down, all-linear or name patterns"
    )
    lora.add_argument("--quantize", default=None, help="QLoRA: int4 or int8 frozen base")
    lora.add_argument("--group-size", type=int, default=None, help="int4 group size (32)")
    lora.add_argument("--no-packing", action="store_true", help="one conversation per row")
    for flag, kind, default in (
        ("--lr", float, 2e-4), ("--steps", int, 100), ("--batch-size", int, 4),
        ("--max-length", int, 512), ("--warmup-steps", int, 10), ("--seed", int, 0),
        ("--log-interval", int, 10),
    ):  # fmt: skip
        lora.add_argument(flag, type=kind, default=default)
    lora.add_argument("--dtype", default="float32", help="autocast: float32, bfloat16, float16")
    lora.add_argument("--device", default="auto", help="auto, cpu, cuda")
    lora.add_argument("--json", action="store_true", help="print one JSON object")
    lora.add_argument("--nproc", type=int, help="N processes (torchrun); see --parallel.strategy")
    lora.set_defaults(accepts_overrides=True)  # --parallel.FIELD VALUE, as in `train`
    lora.epilog_factory = _parallel_help
    lora.formatter_class = argparse.RawDescriptionHelpFormatter
    _classify_train_args(kinds)


def _classify_train_args(kinds) -> None:
    cls = kinds.add_parser("classify", help="train a sequence classifier on labelled text")
    cls.set_defaults(run=finetune_classify)
    cls.add_argument("--model", default="smollm2-135m-instruct", help="the backbone")
    cls.add_argument(
        "--data", required=True, help='shakespeare-genre, or JSONL of {"text", "label"} lines'
    )
    cls.add_argument("--out", required=True, help="classifier folder to write")
    cls.add_argument("--train", default="full", help="full, head (linear probe) or lora")
    cls.add_argument("--pooling", default="last", help="last or mean")
    cls.add_argument("--rank", type=int, default=8, help="lora: adapter rank")
    cls.add_argument("--alpha", type=float, default=16.0, help="lora: adapter alpha")
    cls.add_argument("--targets", default="q,k,v,o", help="lora: layers to adapt")
    for flag, kind, default in (
        ("--steps", int, 200), ("--head-epochs", int, 100), ("--lr", float, 5e-5),
        ("--head-lr", float, 1e-3), ("--batch-size", int, 8), ("--max-length", int, 256),
        ("--eval-every", int, 50), ("--warmup-steps", int, 20), ("--seed", int, 0),
        ("--max-train", int, None), ("--max-eval", int, None),
    ):  # fmt: skip
        cls.add_argument(flag, type=kind, default=default)
    cls.add_argument("--dtype", default=None, help="load the backbone as float32 or bfloat16")
    cls.add_argument("--json", action="store_true", help="print one JSON object")


def finetune_classify(args: argparse.Namespace, _: list[str]) -> None:
    from lmscale.finetune.classify import ClassifyConfig
    from lmscale.finetune.classify_run import finetune_classifier
    from lmscale.finetune.lora import LoRAConfig

    config = ClassifyConfig(
        train=args.train, pooling=args.pooling, max_length=args.max_length,
        batch_size=args.batch_size, steps=args.steps, head_epochs=args.head_epochs, lr=args.lr,
        head_lr=args.head_lr, warmup_steps=args.warmup_steps, eval_every=args.eval_every,
        seed=args.seed,
    )  # fmt: skip
    lora = LoRAConfig(args.rank, args.alpha, 0.0, args.targets) if args.train == "lora" else None
    log = (lambda line: print(line, file=sys.stderr)) if not args.json else (lambda _: None)
    summary = finetune_classifier(
        args.model, args.data, args.out, config, lora, args.max_train, args.max_eval,
        args.dtype, log,
    )  # fmt: skip
    if args.json:
        print(json.dumps(summary))
        return
    test, base = summary["test"], summary["baseline"]
    print(
        f"test ({test['examples']} examples): accuracy {test['accuracy']:.3f}, macro-F1 "
        f"{test['macro_f1']:.3f}; majority baseline: accuracy {base['accuracy']:.3f}, "
        f"macro-F1 {base['macro_f1']:.3f}; {summary['trainable_params']:,} parameters trained "
        f"-> {summary['out']}"
    )


def classify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a classifier folder (lmscale finetune classify)")
    p.add_argument("--text", action="append", default=None, help="a passage (repeatable)")
    p.add_argument("--file", default=None, help='JSONL of {"text"} or {"text", "label"} lines')
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def classify(args: argparse.Namespace, _: list[str]) -> None:
    from lmscale.finetune.classify_io import classify_texts, read_texts

    if not args.text and not args.file:
        raise LmscaleError("classify: give --text or --file")
    texts, gold = list(args.text or []), None
    if args.file:
        file_texts, gold = read_texts(args.file)
        if args.text:
            gold = None  # --text lines carry no labels
        texts += file_texts
    result = classify_texts(args.model, texts, gold, args.batch_size)
    if args.json:
        print(json.dumps(result))
        return
    for row in result["predictions"]:
        line = " ".join(row["text"].split())
        print(f"{row['label']}\t{row['probabilities'][row['label']]:.3f}\t{line[:70]}")
    if "accuracy" in result:
        print(
            f"accuracy {result['accuracy']:.3f}, macro-F1 {result['macro_f1']:.3f} on "
            f"{result['examples']} examples"
        )


def _parallel_help() -> str:
    from lmscale.config import describe_options
    from lmscale.parallel import ParallelConfig

    lines = ["with --nproc (ddp, fsdp or hsdp; tp is refused), as --parallel.FIELD VALUE:"]
    return "\n".join(lines + describe_options("parallel", ParallelConfig, ParallelConfig()))


def finetune_lora(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmscale.finetune import distributed
    from lmscale.finetune.lora import LoRAConfig
    from lmscale.finetune.sft import SFTConfig, finetune_lora

    lora = LoRAConfig(args.rank, args.alpha, args.dropout, args.targets)
    config = SFTConfig(
        model=args.model, data=args.data, steps=args.steps, batch_size=args.batch_size,
        max_length=args.max_length, packing=not args.no_packing, lr=args.lr,
        warmup_steps=args.warmup_steps, quantize=args.quantize, group_size=args.group_size,
        dtype=args.dtype, device=args.device, seed=args.seed, log_interval=args.log_interval,
        parallel=distributed.parallel_config(overrides),
    )  # fmt: skip
    if args.nproc is not None:
        distributed.check_launch(config, args.nproc, args.out)
        distributed.launch_finetune(
            args.nproc, ["lora", *distributed.worker_args(args), *overrides]
        )
        return
    summary = finetune_lora(config, lora, args.out, progress=not args.json)
    if not summary.is_main:  # rank 0 of a distributed run reports for all
        return
    if args.json:
        print(json.dumps(summary.as_dict()))
        return
    print(
        f"loss {summary.first_loss:.4f} -> {summary.loss:.4f} after {summary.steps} steps; "
        f"{summary.trainable_params:,} of {summary.total_params:,} parameters trained -> "
        f"{summary.out}"
    )


def merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the base model the adapter was trained on")
    p.add_argument("--adapter", required=True, help="a LoRA adapter folder")
    p.add_argument("--out", required=True, help="folder to write (a native model folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def merge(args: argparse.Namespace, _: list[str]) -> None:
    from lmscale.finetune.merge import merge_adapter

    out = merge_adapter(args.model, args.adapter, args.out)
    print(json.dumps({"out": str(out)}) if args.json else out)


Verb = tuple[Callable[[argparse.ArgumentParser], None], Callable, str]
VERBS: dict[str, Verb] = {
    "prepare": (prepare_args, prepare, "tokenize a corpus into shards with a manifest"),
    "train": (train_args, train, "train a model from a TOML config"),
    "eval": (eval_args, evaluate, "loss and perplexity of a model on data or a text file"),
    "generate": (generate_args, generate, "continue a prompt, streaming tokens"),
    "chat": (chat_args, chat, "chat with a model on stdin/stdout, using its chat template"),
    "export": (export_args, export, "write a model in another format (hf, native, onnx)"),
    "quantize": (quantize_args, quantize, "weight-only int8 / int4 quantization of a model"),
    "prune": (prune_args, prune, "magnitude, 2:4 or structured pruning of a model"),
    "distill": (distill_args, distill, "train a student from a teacher (KL on soft logits + CE)"),
    "compress-report": (report_args, compress_report, "size, quality, speed of variants"),
    "serve": (serve_args, serve, "serve a model over an OpenAI-compatible HTTP API"),
    "finetune": (finetune_args, None, "fine-tune a model: LoRA / QLoRA adapters, classifiers"),
    "classify": (classify_args, classify, "label passages with a trained classifier"),
    "merge": (merge_args, merge, "fold a LoRA adapter into its base model, save a model folder"),
    "federate": (
        federate_args,
        federate,
        "fine-tune one model across clients whose data stays with them (Flower, with DP)",
    ),
    "plan": (
        plan_args,
        plan,
        "memory, time, cost and energy of training or serving, before it runs",
    ),
    "scaling": (scaling_args, scaling, "train a sweep of sizes, fit scaling laws"),
    "report": (run_report_args, run_report, "an HTML page and PNGs of finished training runs"),
}

if __name__ == "__main__":
    sys.exit(main())
