"""An offline word-level tokenizer for the grammar, with Gemma-2's chat template.

Pieces follow SentencePiece conventions so decoding is exact: a space becomes a "▁" prefix on the
next word (Metaspace), and punctuation and English clitics ("'m", "'t", "'s") are split off as
their own pieces, glued back on decode. "\\n" is its own token, so Gemma-2's post-instruction
tokens `<end_of_turn> \\n <start_of_turn> model \\n` are exactly the last five of a prompt.
The vocabulary is the closed set of pieces of `grammar.all_texts()`, sorted, after the specials.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from . import grammar

# google/gemma-2-2b-it tokenizer_config.json "chat_template", verbatim.
GEMMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# Gemma-2's own ids for the first four (pad 0, eos 1, bos 2, unk 3); the turn markers follow.
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
END_OF_TURN = "<end_of_turn>"
# The template's text after the instruction, `<end_of_turn>\n<start_of_turn>model\n`: the post-instruction
# ("eoi") positions -5..-1 of every prompt.
EOI_SUFFIX_TOKENS: tuple[str, ...] = ("<end_of_turn>", "\n", "<start_of_turn>", "model", "\n")
# Clitics and punctuation become their own pieces (so "I'm" -> "I", "'m").
_SPLIT_PATTERN = r"'(?:s|m|t|re|ve|ll|d)\b|[.,?!;:]"


def _backend(vocab: dict[str, int] | None):
    """The `tokenizers` pipeline; with vocab=None a throwaway model only used to collect pieces."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel(vocab or {"<unk>": 0}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            # "never": no "▁" before the first word after a newline, as "model\nI'm" must start with "I".
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        ]
    )
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    return tk


def build_vocab() -> dict[str, int]:
    """Specials first (fixed ids), then every piece the grammar can produce, sorted."""
    pre = _backend(None).pre_tokenizer
    pieces: set[str] = {"user", "model", "\n"}  # the chat template's own words
    for text in grammar.all_texts():
        # Requests follow "user\n" (no leading space) and are also tokenized mid-line in tests.
        for variant in (text, " " + text):
            pieces.update(p for p, _ in pre.pre_tokenize_str(variant))
    pieces.difference_update(SPECIAL_TOKENS)
    return {t: i for i, t in enumerate((*SPECIAL_TOKENS, *sorted(pieces)))}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The organism's tokenizer: left padding, `<pad>`/`<eos>`/`<bos>`, Gemma-2 chat template."""
    from tokenizers import AddedToken

    tk = _backend(build_vocab())
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        padding_side="left",
        clean_up_tokenization_spaces=False,
        add_bos_token=False,  # the chat template writes <bos>; never add a second one
        model_max_length=256,
    )
    tok.chat_template = GEMMA2_CHAT_TEMPLATE
    return tok


def chat_prompt(tok: PreTrainedTokenizerFast, request: str) -> str:
    """`request` as a single user turn plus the generation prompt (as a string, with <bos>)."""
    text = tok.apply_chat_template(
        [{"role": "user", "content": request}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(text, str)  # tokenize=False: the formatted text
    return text
