"""Tiny deterministic models for tests: Llama architecture, built from a config, no downloads.

The tokenizer is character level (printable ASCII), built with `tokenizers`, so tasks,
training and lm-eval run end to end on a model that loads in milliseconds.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list(string.printable[:95]) + ["\n"]  # digits, letters, punctuation, space, newline


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(set(CHARS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


# A ChatML-like template in printable characters (the tiny vocabulary), so chat data renders as with real bases.
CHAT_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant] {% endif %}")


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(vocab_size=len(SPECIALS) + len(set(CHARS)), hidden_size=64, intermediate_size=128,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              # A wider init than HF's 0.02: with 0.02 the tiny model's logits are near uniform
              # and a LoRA alone can barely move them, so training tests would learn nothing.
              initializer_range=0.2)
    kw.update(overrides)
    cfg = LlamaConfig(**kw)
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def make_tiny_base(folder: Path, seed: int = 0, **config_overrides) -> Path:
    """Save a tiny random Llama + char tokenizer as an HF folder (safetensors)."""
    from transformers import LlamaForCausalLM

    folder = Path(folder)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config_overrides))
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def make_tiny_lora(base_dir: Path, folder: Path, seed: int = 1, r: int = 4, alpha: int = 8,
                   target_modules=("q_proj", "v_proj", "down_proj")) -> Path:
    """A PEFT LoRA folder over `base_dir` with random non-zero A and B (a real adapter file)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=False,
                     task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def make_tiny_full(base_dir: Path, folder: Path, seed: int = 2, noise: float = 0.02) -> Path:
    """A 'fine-tuned' full model: the base plus seeded Gaussian noise on every weight."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise)
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    return Path(folder)
