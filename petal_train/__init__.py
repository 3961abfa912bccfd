"""PETAL training: quality-gated LoRA adapters on a frozen face recognizer."""
