"""Tiny models, tokenizers and corpora made locally (no hub): for tests, benchmarks and the local demo."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

# A prefix-stable chat template: each rendering of a shorter conversation is a prefix of the longer one.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_DEVICES = ["printer", "router", "laptop", "badge reader", "projector", "vpn client", "phone", "monitor"]
_PROBLEMS = ["is offline", "shows error 0x80", "keeps rebooting", "is slow", "rejects the password", "is jammed"]
_FIXES = ["power cycled it", "reset the firmware", "replaced the cable", "cleared the cache", "reissued the token"]
_WORDS = [
    "the",
    "a",
    "river",
    "mountain",
    "city",
    "garden",
    "music",
    "history",
    "science",
    "story",
    "light",
    "water",
    "green",
    "quiet",
    "ancient",
    "people",
    "walked",
    "across",
    "old",
    "bridge",
    "under",
    "bright",
    "sky",
    "while",
    "children",
    "sang",
    "near",
    "small",
    "house",
    "at",
    "evening",
]


def domain_text(rng: random.Random) -> str:
    """A synthetic support ticket (the 'domain')."""
    return (
        f"ticket {rng.randint(1000, 9999)}: the {rng.choice(_DEVICES)} on floor {rng.randint(1, 9)} "
        f"{rng.choice(_PROBLEMS)}. fix: {rng.choice(_FIXES)}."
    )


def general_text(rng: random.Random) -> str:
    """A synthetic general sentence plus a sum (the 'general' data)."""
    words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 20)))
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    return f"{words}. {a} plus {b} is {a + b}."


def chat_record(rng: random.Random) -> dict[str, Any]:
    """A synthetic support conversation."""
    device = rng.choice(_DEVICES)
    return {
        "messages": [
            {"role": "system", "content": "you are the help desk."},
            {"role": "user", "content": f"my {device} {rng.choice(_PROBLEMS)}"},
            {"role": "assistant", "content": f"i {rng.choice(_FIXES)} on the {device}."},
        ]
    }


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write records as jsonl."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
    return path


def write_corpus(path: Path, kind: str, n: int, seed: int, sentences: int = 1) -> Path:
    """n synthetic records of kind 'domain', 'general' or 'chat' as jsonl (text records of ``sentences``)."""
    rng = random.Random(f"{kind}:{seed}")
    if kind == "chat":
        return write_jsonl(path, (chat_record(rng) for _ in range(n)))
    gen = domain_text if kind == "domain" else general_text
    return write_jsonl(path, ({"text": " ".join(gen(rng) for _ in range(sentences))} for _ in range(n)))


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, chat_template: str | None = None) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def tiny_llama(
    tokenizer: Any,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    max_positions: int = 512,
    seed: int = 0,
) -> Any:
    """A randomly initialised Llama-shaped causal LM for ``tokenizer``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def make_model_folder(folder: Path, chat_template: str | None = CHAT_TEMPLATE, seed: int = 0, **shape: int) -> Path:
    """Write a tiny model + tokenizer folder that AutoModelForCausalLM/AutoTokenizer.from_pretrained load."""
    rng = random.Random(seed)
    texts = [domain_text(rng) for _ in range(300)] + [general_text(rng) for _ in range(300)]
    texts += [" ".join(m["content"] for m in chat_record(rng)["messages"]) for _ in range(100)]
    texts += ["<|system|> <|user|> <|assistant|>"] * 20
    tok = train_tokenizer(texts, chat_template=chat_template)
    model = tiny_llama(tok, seed=seed, **shape)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder
