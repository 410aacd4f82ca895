import dataclasses

import pytest

from lmscale.config import field_docs, from_dict, parse_overrides
from lmscale.errors import LmscaleError
from lmscale.model import ModelConfig
from lmscale.train.config import DataConfig, TrainConfig


@pytest.mark.parametrize("cls", [ModelConfig, DataConfig, TrainConfig])
def test_every_config_field_has_a_docstring_for_help(cls):
    docs = field_docs(cls)
    assert all(docs.get(f.name) for f in dataclasses.fields(cls)), set(docs) ^ {
        f.name for f in dataclasses.fields(cls)
    }


def test_overrides_are_typed_and_name_the_option():
    parsed = parse_overrides(["--train.max_steps", "7", "--train.dtype=bfloat16"])
    assert parsed == {"train": {"max_steps": "7", "dtype": "bfloat16"}}
    config = from_dict(TrainConfig, parsed["train"], "train.")
    assert config.max_steps == 7 and config.dtype == "bfloat16"
    with pytest.raises(LmscaleError, match="option 'train.max_steps' must be int"):
        from_dict(TrainConfig, {"max_steps": "many"}, "train.")
    with pytest.raises(LmscaleError, match="needs a value"):
        parse_overrides(["--train.lr"])
