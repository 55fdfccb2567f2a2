"""Offline stand-ins for the tokenizers of FLUX's text encoders (CLIP, T5, Qwen3, Mistral-3).

transformers ships no tokenizer files, and nothing may be downloaded, so the tiny model gets
word-level tokenizers built with the `tokenizers` library. They speak the same interface the
FluxPipeline uses (padding to max_length, truncation, eos handling), which is all it needs.
"""

from __future__ import annotations

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

# Words that captions of people, pets, objects and scenes tend to use, so that test captions map
# to distinct ids instead of collapsing onto the unknown token.
CAPTION_WORDS = """
a an the of and with in on at to from by for near under over behind beside between into
photo photograph picture image portrait close-up closeup shot selfie painting drawing
illustration sketch render style art artwork cinematic film analog digital studio
man woman person people boy girl child kid baby face head hair eyes eye nose mouth lips
smile smiling beard glasses hat cap shirt jacket coat dress suit tie scarf hoodie sweater
dog cat bird horse car bike bicycle tree trees flower flowers grass sky cloud clouds sun
moon star stars mountain mountains river lake sea ocean beach sand water snow rain city
street road building house room wall window door table chair bed sofa floor kitchen
garden park forest field desert bridge tower light lights shadow background foreground
red orange yellow green blue purple pink brown black white gray grey gold silver dark
bright colorful pale warm cold soft sharp blurry blurred detailed simple plain
big small large tiny tall short long wide round square circle triangle rectangle shape
shapes line lines dot dots stripe stripes pattern texture object objects toy ball box
cup bottle book phone camera lamp clock vase plate bowl fruit apple banana food
standing sitting walking running lying looking holding wearing posing facing smiling
front back side left right top bottom center middle corner view angle
day night morning evening sunset sunrise indoor indoors outdoor outdoors
high low quality resolution best realistic photorealistic lighting natural
young old happy sad serious calm
one two three four five several many some
is are has have this that it its his her their
sks ohwx tok zwx
"""
PUNCTUATION = [",", ".", "!", "?", ":", ";", "-", "'", '"', "(", ")"]

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512


def _vocab(specials: list[str]) -> dict[str, int]:
    words = list(dict.fromkeys(CAPTION_WORDS.split()))
    tokens = specials + words + PUNCTUATION
    return {token: index for index, token in enumerate(tokens)}


def _word_level(vocab: dict[str, int], unk: str) -> Tokenizer:
    tokenizer = Tokenizer(WordLevel(vocab, unk_token=unk))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def build_clip_tokenizer() -> PreTrainedTokenizerFast:
    """CLIP-like: <|startoftext|> words <|endoftext|>, padded to 77."""
    bos, eos, pad, unk = "<|startoftext|>", "<|endoftext|>", "<pad>", "<unk>"
    vocab = _vocab([pad, bos, eos, unk])
    tokenizer = _word_level(vocab, unk)
    tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        model_max_length=CLIP_MAX_LENGTH,
    )


def build_t5_tokenizer() -> PreTrainedTokenizerFast:
    """T5-like: words </s>, padded to 512, pad id 0 as T5 expects."""
    pad, eos, unk = "<pad>", "</s>", "<unk>"
    vocab = _vocab([pad, eos, unk])
    tokenizer = _word_level(vocab, unk)
    tokenizer.post_processor = TemplateProcessing(
        single=f"$A {eos}", special_tokens=[(eos, vocab[eos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        model_max_length=T5_MAX_LENGTH,
    )


# Qwen3's chat markers and its template's shape (user turn, then an assistant turn whose thinking
# is closed at once when enable_thinking=False), which Flux2KleinPipeline renders every prompt into.
_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<unk>"]
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def build_qwen3_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen3-like: chat markers as special tokens, no bos/eos added, right-padded with <|endoftext|>
    as Qwen pads."""
    pad, unk = "<|endoftext|>", "<unk>"
    tokenizer = _word_level(_vocab(_QWEN_SPECIALS), unk)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=pad,
        eos_token="<|im_end|>",
        unk_token=unk,
        additional_special_tokens=_QWEN_SPECIALS[1:5],
        model_max_length=T5_MAX_LENGTH,
        chat_template=QWEN3_CHAT_TEMPLATE,
    )


# Mistral's control tokens as Mistral-Small-3's tokenizer spells them, and its chat template's shape
# ([SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]) for the message lists Flux2Pipeline builds,
# whose contents are lists of {"type": "text"} (and, for edits, {"type": "image"}) items.
MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                    "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
MISTRAL3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join('') %}{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]"
    "{% if message['content'] is not string %}{% for item in message['content'] if item['type'] == 'image' %}[IMG]"
    "{% endfor %}{% endif %}{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)


def build_mistral3_tokenizer() -> PreTrainedTokenizerFast:
    """Mistral-3-like: <s> from the chat template, control tokens as special tokens, right-padded
    with <pad>. FLUX.2 [dev] ships a PixtralProcessor, whose text path is its tokenizer's; the
    processor itself needs torchvision, which this project does not install."""
    tokenizer = _word_level(_vocab(MISTRAL_SPECIALS), "<unk>")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=MISTRAL_SPECIALS[4:],
        model_max_length=T5_MAX_LENGTH,
        chat_template=MISTRAL3_CHAT_TEMPLATE,
    )
