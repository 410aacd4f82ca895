"""Fine-tuning: LoRA and QLoRA adapters, and supervised fine-tuning on chat data.

- `lora`: `LoRALinear`, `apply_lora_` (targets by short name or pattern), merge / unmerge,
  named adapters switched with `set_adapter`;
- `adapter`: adapter folders (`save_adapter`, `load_adapter`) that refuse a foreign base;
- `sft_data`: chat JSONL rendered with the model's template, assistant-only targets, packing;
- `sft`: `finetune_lora`, the training run behind `lmscale finetune lora`;
- `merge`: `merge_adapter`, behind `lmscale merge`;
- `distributed`: `finetune lora --nproc N` under torchrun (ddp, fsdp, hsdp);
- `classify`, `classify_run`, `classify_io`: sequence classification on the backbone, behind
  `lmscale finetune classify` and `lmscale classify`.
"""

from lmscale.finetune.adapter import load_adapter, save_adapter
from lmscale.finetune.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora_,
    disable_adapters,
    merge_and_unload,
    merge_lora_,
    set_adapter,
    unmerge_lora_,
)

__all__ = [
    "LoRAConfig",
    "LoRALinear",
    "apply_lora_",
    "disable_adapters",
    "load_adapter",
    "merge_and_unload",
    "merge_lora_",
    "save_adapter",
    "set_adapter",
    "unmerge_lora_",
]
