"""Tiny random causal LMs with a character-level tokenizer, written to a local directory.

Used by the LLM tests and the TRL comparison benchmark: a real ``AutoModelForCausalLM`` +
``PreTrainedTokenizerFast`` pair that reloads offline with ``from_pretrained(path)``, small enough
to train on a CPU in seconds. One character = one token, so tests can build token sequences by hand.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "CHAT_TEMPLATE", "build_char_tokenizer", "build_tiny_causal_lm"]

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]
# role: content lines, then "assistant: " as the generation prompt
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
_ARCHS = {"qwen2", "llama"}


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level fast tokenizer over printable ASCII + newline, with pad/eos/bos/unk."""
    chars = list(string.printable[:95]) + ["\n"]  # digits, letters, punctuation, space; newline
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join characters without separators
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_causal_lm(
    path: str | Path, *, arch: str = "qwen2", hidden_size: int = 32, num_layers: int = 2,
    num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int | None = None, initializer_range: float = 0.3,
    seed: int = 0,
) -> Path:
    """Write a random ``arch`` ("qwen2" or "llama") causal LM and its char tokenizer to ``path``.

    Returns ``path``; load it back with ``AutoModelForCausalLM.from_pretrained(path)`` and
    ``PreTrainedTokenizerFast.from_pretrained(path)`` (for a qwen2 directory transformers 5's
    ``AutoTokenizer`` substitutes its byte-level Qwen2Tokenizer). ``seed`` fixes the weights.
    The default ``initializer_range`` (0.3, vs 0.02 in transformers) makes the random model's
    next-token distributions peaked and context-dependent, so greedy text varies like real text.
    """
    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {sorted(_ARCHS)}, got {arch!r}")
    path = Path(path)
    tok = build_char_tokenizer()
    config = AutoConfig.for_model(
        arch, vocab_size=len(tok), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size or 2 * hidden_size, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        tie_word_embeddings=True, initializer_range=initializer_range,
    )
    torch.manual_seed(seed)  # from_config draws its init from the global stream
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
