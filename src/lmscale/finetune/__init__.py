"""Fine-tuning: LoRA and QLoRA adapters, and supervised fine-tuning on chat data."""
