"""The small demo Xoron MoE-LLaMA checkpoint and tokenizer shipped with the package (see TRAINING.md)."""
