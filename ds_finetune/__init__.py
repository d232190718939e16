"""ds-finetune: crash-safe, exactly-resumable fine-tuning of causal LLMs on DeepSpeed ZeRO 0-3."""

__version__ = "0.1.0"
