"""Nested training state as a JSON skeleton plus a flat dict of tensors, with no pickle.

An optimizer `state_dict()`, RNG states and counters are trees of dicts, lists and tuples whose
leaves are tensors, numpy arrays and plain scalars. `flatten_state` splits such a tree into a
JSON-able skeleton and a `{name: tensor}` dict that safetensors can store; `unflatten_state`
puts it back together exactly (int dict keys stay ints, tuples stay tuples).

Skeleton encoding (everything else is plain JSON):

    tensor          {"__tensor__": name}
    numpy array     {"__ndarray__": name, "dtype": "uint32", "shape": [624]}
    tuple           {"__tuple__": [...]}
    dict, str keys  {...}                       (when no key is one of the tags above)
    other dicts     {"__dict__": [[key, value], ...]}   (int / float / bool / None keys)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

TAGS = ("__tensor__", "__ndarray__", "__tuple__", "__dict__")
_SCALARS = (bool, int, float, str, type(None))


def flatten_state(obj: Any) -> tuple[Any, dict[str, Tensor]]:
    """Split a nested state into a JSON-able skeleton and a flat dict of tensors.

    Args:
        obj: nested dict / list / tuple with leaves of tensor, numpy array, int, float, bool,
            str or None. Dict keys may be str, int, float, bool or None.

    Returns:
        (skeleton, tensors): the skeleton refers to each tensor by its name in `tensors`.
        Tensors are detached, on the CPU and contiguous.
    """
    tensors: dict[str, Tensor] = {}
    return _flatten(obj, "", tensors), tensors


def unflatten_state(skeleton: Any, tensors: dict[str, Tensor]) -> Any:
    """Rebuild the nested state that `flatten_state` split.

    Args:
        skeleton: the JSON-able skeleton (as returned, or after a JSON round trip).
        tensors: the flat `{name: tensor}` dict.

    Returns:
        The nested state, with tuples, int keys and numpy arrays restored.
    """
    if isinstance(skeleton, list):
        return [unflatten_state(item, tensors) for item in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if "__ndarray__" in skeleton:
        return _to_ndarray(tensors[skeleton["__ndarray__"]], skeleton["dtype"], skeleton["shape"])
    if "__tuple__" in skeleton:
        return tuple(unflatten_state(item, tensors) for item in skeleton["__tuple__"])
    if "__dict__" in skeleton:
        return {key: unflatten_state(value, tensors) for key, value in skeleton["__dict__"]}
    return {key: unflatten_state(value, tensors) for key, value in skeleton.items()}


def _flatten(obj: Any, path: str, tensors: dict[str, Tensor]) -> Any:
    """Encode one node of the tree; tensors found below it are added to `tensors`."""
    if isinstance(obj, Tensor):
        return {"__tensor__": _add(tensors, path, obj.detach().cpu().contiguous())}
    if isinstance(obj, np.ndarray):
        return _flatten_ndarray(obj, path, tensors)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, _SCALARS):
        return obj
    if isinstance(obj, list):
        return [_flatten(item, _join(path, i), tensors) for i, item in enumerate(obj)]
    if isinstance(obj, tuple):
        return {
            "__tuple__": [_flatten(item, _join(path, i), tensors) for i, item in enumerate(obj)]
        }
    if isinstance(obj, dict):
        return _flatten_dict(obj, path, tensors)
    raise TypeError(f"cannot store {type(obj).__name__} at '{path or '<root>'}' in a checkpoint")


def _flatten_dict(obj: dict, path: str, tensors: dict[str, Tensor]) -> Any:
    """Plain JSON object when every key is a str that is not a tag, else a list of pairs."""
    for key in obj:
        if not isinstance(key, _SCALARS):
            raise TypeError(f"cannot store dict key {key!r} at '{path or '<root>'}'")
    values = {key: _flatten(value, _join(path, key), tensors) for key, value in obj.items()}
    if all(isinstance(key, str) and key not in TAGS for key in obj):
        return values
    return {"__dict__": [[key, value] for key, value in values.items()]}


def _flatten_ndarray(array: np.ndarray, path: str, tensors: dict[str, Tensor]) -> dict:
    """Store a numpy array as its raw bytes (uint8), with dtype and shape in the skeleton."""
    if array.dtype.hasobject:
        raise TypeError(f"cannot store a numpy array of objects at '{path or '<root>'}'")
    raw = torch.frombuffer(bytearray(array.tobytes()), dtype=torch.uint8)
    name = _add(tensors, path, raw)
    return {"__ndarray__": name, "dtype": array.dtype.str, "shape": list(array.shape)}


def _to_ndarray(raw: Tensor, dtype: str, shape: list[int]) -> np.ndarray:
    """Inverse of `_flatten_ndarray`."""
    return np.frombuffer(raw.numpy().tobytes(), dtype=np.dtype(dtype)).reshape(shape).copy()


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _add(tensors: dict[str, Tensor], path: str, tensor: Tensor) -> str:
    """Add `tensor` under a name derived from its path, made unique if that name is taken."""
    name, n = path or "root", 1
    while name in tensors:
        name, n = f"{path}#{n}", n + 1
    tensors[name] = tensor
    return name
