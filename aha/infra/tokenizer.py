"""The built-in character tokenizer, made with the `tokenizers` library.

Every printable ASCII character and newline is one token; the R1 tags `<think>`, `</think>`,
`<answer>`, `</answer>` are single tokens too, so a 3M-parameter model spends no capacity on
spelling them. Wrapped in `PreTrainedTokenizerFast` and saved with `save_pretrained`, so
transformers, TRL and vLLM load it with `AutoTokenizer.from_pretrained(dir)`.
"""

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS = "<|pad|>", "<|endoftext|>"
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
TOOL_TAGS = ["<tool>", "</tool>", "<output>", "</output>"]     # the tool demo's tokenizer adds these (aha/core/tools/)
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]

# Used by `aha chat` / `aha serve` to turn messages into the R1-Zero prompt the model was trained on.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}Assistant: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def build_char_tokenizer(tags: list[str] = TAGS) -> PreTrainedTokenizerFast:
    """`tags`: the tags that are single tokens (the tool demo's model adds TOOL_TAGS to TAGS)."""
    vocab = {tok: i for i, tok in enumerate([PAD, EOS] + tags + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    # Tags are ordinary (non-special) added tokens: they survive `skip_special_tokens=True`.
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in tags])
    tok.add_special_tokens([AddedToken(t, special=True) for t in (PAD, EOS)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, padding_side="left",
        model_max_length=512, clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
