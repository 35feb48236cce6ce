"""A tiny random LLaMA with a real (small) BPE tokenizer, built locally in seconds.

Fast tests run every stage on this model; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TRAIN_TEXT = (
    """The quick brown fox jumps over the lazy dog. Question: Who wrote Hamlet? Answer: William Shakespeare.
Paris is the capital of France. The river Thames flows through London. Context: The Chipmunks were created by
Ross Bagdasarian. Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ; : ! ? ( ) " ' - appear in text.
Valkyrie, Robert Boulter, Senjō no Valkyria 3: Unrecorded Chronicles is a tactical role-playing video game.
"""
    * 4
)


def build_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TRAIN_TEXT], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


def build_tiny_llama(path: Path, *, layers: int = 8, hidden: int = 64, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden + 32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    # Random init at std 0.02 gives near-uniform logits; a larger scale makes layers matter,
    # so importance rankings and greedy outputs are not all ties.
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
