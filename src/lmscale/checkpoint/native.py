"""The native checkpoint format: one directory per step, written atomically.

    run/checkpoints/
        step_00000100/
            model.safetensors        weights; tied tensors stored once (aliases in the metadata)
            config.json              {"model": {...}, "run": {...}, ...}
            tokenizer.json           optional
            train_state.safetensors  optional: optimizer, RNG, loader position... (tensors)
            train_state.json         optional: the same state's skeleton (see `state.py`)
        .tmp-step_00000200-4242/     a save in progress (or a crashed one): never listed

NOTE: a checkpoint appears only by `os.replace` of a finished, fsynced temp directory, and one
disappears only by a rename to a `.old-` (being replaced) or `.del-` (being deleted) name first. So a crash at any moment leaves
every listed `step_*` directory whole; the next save clears the leftovers. One writer per directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from lmscale.checkpoint.sharded import is_sharded, read_sharded_model_state
from lmscale.checkpoint.state import flatten_state, unflatten_state
from lmscale.errors import LmscaleError

_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX, _OLD_PREFIX, _DEL_PREFIX = ".tmp-", ".old-", ".del-"
_ALIASES_KEY, _STEP_KEY = "lmscale.aliases", "lmscale.step"


@dataclass
class Checkpoint:
    """Everything one checkpoint directory holds, loaded into memory."""

    path: Path
    step: int
    config: dict
    model_state: dict[str, Tensor]
    tokenizer_json: str | None = None
    train_state: dict | None = None


def save_checkpoint(
    directory: str | Path,
    step: int,
    model_state: dict[str, Tensor],
    config: dict,
    tokenizer_json: str | None = None,
    train_state: dict | None = None,
    keep: int | None = None,
) -> Path:
    """Write `directory/step_{step:08d}/` atomically, replacing any checkpoint of that step.

    Args:
        directory: the folder of checkpoints (created if missing).
        step: the training step; names the checkpoint.
        model_state: the model's `state_dict()`; tensors sharing storage are stored once.
        config: JSON-able dict, e.g. `{"model": {...}, "run": {...}}`.
        tokenizer_json: the tokenizer's JSON text, if any.
        train_state: nested optimizer / RNG / loader state (see `flatten_state`), if any.
        keep: when set, delete all but the newest `keep` checkpoints after the save.

    Returns:
        The path of the new checkpoint directory.
    """
    if step < 0:
        raise LmscaleError(f"checkpoint step must be >= 0, got {step}")
    if keep is not None and keep < 1:
        raise LmscaleError(f"keep must be at least 1, got {keep}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    clear_leftovers(directory)
    name = f"step_{step:08d}"
    tmp = temp_checkpoint_dir(directory, step)
    tmp.mkdir()
    try:
        _write_contents(tmp, step, model_state, config, tokenizer_json, train_state)
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # e.g. a config that is not JSON-able
        raise
    return publish_checkpoint(tmp, directory / name, keep)


def save_model_dir(
    out: str | Path, model_state: dict[str, Tensor], config: dict, tokenizer_json: str | None
) -> Path:
    """Write one model (no train state) as a native folder at `out`, atomically.

    The folder loads wherever a checkpoint does (`--model OUT`); an existing `out` is refused.
    """
    out = Path(out)
    if out.exists():
        raise LmscaleError(f"{out} already exists: choose a new --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{_TMP_PREFIX}{out.name}-{os.getpid()}")
    tmp.mkdir()
    try:
        _write_contents(tmp, 0, model_state, config, tokenizer_json, None)
        _fsync_dir(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def temp_checkpoint_dir(directory: Path, step: int, tag: str | int | None = None) -> Path:
    """Where a save of `step` is written before `publish_checkpoint` renames it into place."""
    return directory / f"{_TMP_PREFIX}step_{step:08d}-{os.getpid() if tag is None else tag}"


def publish_checkpoint(tmp: Path, final: Path, keep: int | None) -> Path:
    """Rename the finished, fsynced `tmp` to `final` atomically; keep the newest `keep`."""
    directory = final.parent
    old = _move_aside(final, _OLD_PREFIX) if final.exists() else None
    os.replace(tmp, final)
    _fsync_dir(directory)
    if old is not None:
        shutil.rmtree(old)
    if keep is not None:
        for path in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(_move_aside(path, _DEL_PREFIX))
    return final


def list_checkpoints(directory: str | Path) -> list[Path]:
    """The complete checkpoints in `directory`, oldest step first ([] if there are none)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint with the highest step in `directory`, or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def resolve_checkpoint(source: str | Path) -> Path:
    """Find the checkpoint a user means by `source`.

    Args:
        source: a checkpoint directory, a run directory (holding `checkpoints/`), or a
            directory of checkpoints; the latter two resolve to their latest checkpoint.

    Returns:
        The checkpoint directory.
    """
    source = Path(source)
    if (
        _STEP_DIR.match(source.name)
        or (source / "model.safetensors").exists()
        or is_sharded(source)
    ):
        if source.is_dir():
            return source
    elif source.is_dir():
        found = latest_checkpoint(source / "checkpoints") or latest_checkpoint(source)
        if found is not None:
            return found
    raise LmscaleError(f"no checkpoint in {source}")


def load_checkpoint(source: str | Path, with_train_state: bool = True) -> Checkpoint:
    """Load a checkpoint (see `resolve_checkpoint` for what `source` may be).

    Args:
        source: a checkpoint, run or checkpoints directory.
        with_train_state: also load `train_state.*` when the checkpoint has it.

    Returns:
        The loaded `Checkpoint`; a missing or corrupt file raises `LmscaleError` naming it.
    """
    path = resolve_checkpoint(source)
    config = _read_json(path / "config.json")
    if not isinstance(config, dict):
        raise LmscaleError(f"{path / 'config.json'} must hold a JSON object")
    tokenizer_file = path / "tokenizer.json"
    tokenizer_json = tokenizer_file.read_text(encoding="utf-8") if tokenizer_file.exists() else None
    train_state = None
    if is_sharded(path):  # written by a distributed run: weights gathered from the DCP shards
        model_state = read_sharded_model_state(path)
        train_state = _read_json(path / "train_state.json")
        step = int(train_state.get("step", _parse_step({}, path)))
        return Checkpoint(path, step, config, model_state, tokenizer_json, train_state)
    model_state, metadata = _read_tensors(path / "model.safetensors")
    step = _parse_step(metadata, path)
    if with_train_state and (path / "train_state.json").exists():
        tensors, _ = _read_tensors(path / "train_state.safetensors")
        train_state = unflatten_state(_read_json(path / "train_state.json"), tensors)
    return Checkpoint(path, step, config, model_state, tokenizer_json, train_state)


def _write_contents(
    folder: Path,
    step: int,
    model_state: dict[str, Tensor],
    config: dict,
    tokenizer_json: str | None,
    train_state: dict | None,
) -> None:
    """Write and fsync every file of a checkpoint into `folder`."""
    _write_tensors(folder / "model.safetensors", model_state, {_STEP_KEY: str(step)})
    write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")
    if tokenizer_json is not None:
        write_text(folder / "tokenizer.json", tokenizer_json)
    if train_state is not None:
        skeleton, tensors = flatten_state(train_state)
        _write_tensors(folder / "train_state.safetensors", tensors, {})
        write_text(folder / "train_state.json", json.dumps(skeleton) + "\n")


def _write_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Save tensors to safetensors: on the CPU, contiguous, shared storage stored once."""
    unique, aliases = _dedupe(tensors)
    save_file(unique, path, metadata=metadata | {_ALIASES_KEY: json.dumps(aliases)})
    fsync_file(path)


def _dedupe(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Split tensors into unique ones and `{alias: name}` for exact views of an earlier one.

    Tensors that only partly overlap an earlier one (a slice of it) are copied instead.
    """
    unique: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        view = (*storage, tensor.storage_offset(), tensor.shape, tensor.stride(), tensor.dtype)
        if tensor.numel() > 0 and view in seen:
            aliases[name] = seen[view]
            continue
        tensor = tensor.cpu().contiguous()
        if tensor.numel() > 0 and storage in storages:
            tensor = tensor.clone()
        seen[view], unique[name] = name, tensor
        storages.add(storage)
    return unique, aliases


def _read_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Load a safetensors file and its aliases; a missing or corrupt file raises LmscaleError."""
    if not path.is_file():
        raise LmscaleError(f"checkpoint file missing: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        aliases = json.loads(metadata.get(_ALIASES_KEY, "{}"))
        for alias, name in aliases.items():
            tensors[alias] = tensors[name]
    except Exception as error:  # safetensors raises several types for a damaged file
        raise LmscaleError(f"corrupt or truncated checkpoint file {path}: {error}") from None
    return tensors, metadata


def _read_json(path: Path) -> Any:
    """Parse a JSON file; a missing or malformed file raises LmscaleError naming it."""
    if not path.is_file():
        raise LmscaleError(f"checkpoint file missing: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise LmscaleError(f"corrupt checkpoint file {path}: {error}") from None


def _parse_step(metadata: dict[str, str], path: Path) -> int:
    """The step recorded in model.safetensors, else the one in the directory's name."""
    if _STEP_KEY in metadata and metadata[_STEP_KEY].isdigit():
        return int(metadata[_STEP_KEY])
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else 0


def clear_leftovers(directory: Path) -> None:
    """Remove temp dirs of crashed saves; put back a checkpoint a crash left moved aside."""
    for path in directory.iterdir():
        if path.name.startswith(_OLD_PREFIX):
            original = directory / path.name[len(_OLD_PREFIX) :].rsplit("-", 1)[0]
            if _STEP_DIR.match(original.name) and not original.exists():
                os.replace(path, original)  # the crash fell between the two renames of a save
            else:
                shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith((_TMP_PREFIX, _DEL_PREFIX)):
            shutil.rmtree(path, ignore_errors=True)
    _fsync_dir(directory)


def _move_aside(path: Path, prefix: str) -> Path:
    """Rename a checkpoint out of the listing: `.old-` while replaced, `.del-` when deleted."""
    old = path.with_name(f"{prefix}{path.name}-{os.getpid()}")
    os.replace(path, old)
    _fsync_dir(path.parent)
    return old


def write_text(path: Path, text: str) -> None:
    """Write and fsync a text file."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    """Make renames inside `path` durable (a no-op where directories cannot be opened)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
