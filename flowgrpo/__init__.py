"""flowgrpo: online RL (GRPO) for flow-matching text-to-image models and text LLM policies."""
__version__ = "0.1.0"
