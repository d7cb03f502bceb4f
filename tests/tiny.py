"""Tiny random Gemma-2, Llama-3 and SmolLM2 (Llama, ChatML, no BOS) models with tokenizers whose chat templates match the real
families, built offline from config. They go through the same loading and intervention code as
the real models (issue: "tiny random models of the same architecture").
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from refusal_nnsight.config import ModelConfig

# google/gemma-2-2b-it's chat template (tokenizer_config.json).
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# Llama-3 header format without the default system block (Arditi et al.'s LLAMA3 template).
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

WORDS = [
    "I",
    "can't",
    "help",
    "with",
    "that",
    ".",
    "Sure",
    "here",
    "is",
    "how",
    "to",
    "make",
    "a",
    "cake",
    "bomb",
    "kill",
    "process",
    "person",
    "tell",
    "me",
    "the",
    "a",
    "an",
    "what",
    "is",
    "of",
    "for",
    "story",
    "please",
    "explain",
    "steps",
    "write",
    "code",
    "hello",
    "there",
    "?",
    ",",
    "!",
    "user",
    "model",
    "assistant",
]
# SmolLM2's default system turn and second refusal word (the ChatML tokenizer only: the other
# tokenizers keep their vocabulary, so their random models stay as they were)
CHATML_WORDS = [
    "system",
    "You",
    "are",
    "helpful",
    "AI",
    "named",
    "SmolLM,",
    "trained",
    "by",
    "Hugging",
    "Face",
    "Sorry",
]

# HuggingFaceTB/SmolLM2-135M-Instruct's chat template (the one its GGUF file carries): ChatML with a
# default system turn and no BOS.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _tokenizer(
    specials: list[str], bos: str, eos: str, pad: str, template: str, words: tuple[str, ...] = ()
) -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(specials + ["<unk>", "\n"] + sorted(set(WORDS) | set(words)))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Newlines are tokens of their own (the eoi suffix ends with "\n"); words split on spaces/punctuation.
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.Split(" ", behavior="removed")]
    )
    tk.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=bos, eos_token=eos, pad_token=pad, unk_token="<unk>",
        additional_special_tokens=[s for s in specials if s not in (bos, eos, pad)],
    )  # fmt: skip
    tok.chat_template = template
    tok.padding_side = "left"
    return tok


def gemma2_tokenizer() -> PreTrainedTokenizerFast:
    return _tokenizer(
        ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        "<bos>",
        "<eos>",
        "<pad>",
        GEMMA2_TEMPLATE,
    )


def llama3_tokenizer() -> PreTrainedTokenizerFast:
    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    return _tokenizer(specials, "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", LLAMA3_TEMPLATE)


def chatml_tokenizer() -> PreTrainedTokenizerFast:
    """SmolLM2's special tokens: it names <|im_start|> its BOS, though no BOS opens a prompt."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return _tokenizer(
        specials, "<|im_start|>", "<|im_end|>", "<|im_end|>", CHATML_TEMPLATE, tuple(CHATML_WORDS)
    )


def tiny_gemma2(seed: int = 0, n_layers: int = 3, d: int = 64, intermediate: int | None = None):
    tok = gemma2_tokenizer()
    torch.manual_seed(seed)
    cfg = Gemma2Config(
        vocab_size=len(tok), hidden_size=d, intermediate_size=intermediate or 4 * d, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        attn_implementation="eager", sliding_window=64,
    )  # fmt: skip
    return Gemma2ForCausalLM(cfg).eval(), tok


def tiny_llama3(seed: int = 0, n_layers: int = 3, d: int = 64):
    tok = llama3_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=d, intermediate_size=4 * d, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval(), tok


def tiny_smollm2(seed: int = 0, n_layers: int = 3, d: int = 64):
    """A LlamaForCausalLM with tied embeddings, as SmolLM2-135M-Instruct, and its ChatML tokenizer."""
    tok = chatml_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=d, intermediate_size=4 * d, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval(), tok


def model_config(family: str, n_layers: int = 3, d: int = 64) -> ModelConfig:
    """The same family facts as conf/model/{gemma2_2b_it,llama31_8b_it,smollm2_135m_it}.yaml, with
    tiny shapes."""
    if family == "chatml":
        return ModelConfig(
            name="tiny_smollm2", source="hf", family="chatml", bos=False, n_layers=n_layers, d_model=d,
            device="cpu", attn_implementation=None, refusal_strings=["I", "Sorry"],
        )  # fmt: skip
    if family == "gemma2":
        return ModelConfig(
            name="tiny_gemma2", source="hf", family="gemma2", n_layers=n_layers, d_model=d, device="cpu"
        )
    return ModelConfig(
        name="tiny_llama3", source="hf", family="llama3", n_layers=n_layers, d_model=d, device="cpu",
        attn_implementation=None,
    )  # fmt: skip


def random_jumprelu_sae(d_in: int, d_sae: int, layer: int, seed: int = 0, scope: str = "gemma"):
    """A random JumpReLU SAE shaped and configured like Gemma Scope (per-latent threshold) or
    Llama Scope (one scalar threshold broadcast), as sae-lens loads them."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    g = torch.Generator().manual_seed(seed)
    cfg = JumpReLUSAEConfig(
        d_in=d_in, d_sae=d_sae, dtype="float32", device="cpu", apply_b_dec_to_input=False,
        metadata=SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post", model_name=f"tiny-{scope}"),
    )  # fmt: skip
    sae = JumpReLUSAE(cfg)
    with torch.no_grad():
        W = torch.randn(d_sae, d_in, generator=g)
        W = W / W.norm(dim=-1, keepdim=True)
        sae.W_dec.copy_(W)
        sae.W_enc.copy_(W.T * 0.5)
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.05)
        sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.01)
        thr = torch.rand(d_sae, generator=g) * 0.2 if scope == "gemma" else torch.full((d_sae,), 0.1)
        sae.threshold.copy_(thr)
    return sae
