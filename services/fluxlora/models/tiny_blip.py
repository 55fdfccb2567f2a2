"""A tiny randomly initialised BLIP captioner with its processor, written like a real checkpoint.

The "blip" captioner loads it with the same from_pretrained calls that load
Salesforce/blip-image-captioning-base/-large, so tests run the whole path (image processor,
generate, decode) offline in milliseconds. Its captions are word salad from a small vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.processors import TemplateProcessing
from transformers import (
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessorPil,
    BlipProcessor,
    GenerationConfig,
    PreTrainedTokenizerFast,
)

from fluxlora.models.tiny_tokenizers import CAPTION_WORDS, PUNCTUATION

# BERT's special tokens, as BLIP's text decoder uses them: [DEC] starts a caption, [SEP] ends it.
PAD, UNK, CLS, SEP, MASK, DEC = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"
IMAGE_SIZE = 32
MAX_POSITIONS = 64
# As for the tiny Florence-2: a large initialisation makes the output depend on the image.
INIT_STD = 0.5


def tiny_blip_vocab() -> dict[str, int]:
    tokens = list(dict.fromkeys([PAD, UNK, CLS, SEP, MASK, DEC, *CAPTION_WORDS.split(), *PUNCTUATION]))
    return {token: index for index, token in enumerate(tokens)}


def build_tiny_blip_processor() -> BlipProcessor:
    vocab = tiny_blip_vocab()
    backend = Tokenizer(WordLevel(vocab, unk_token=UNK))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.post_processor = TemplateProcessing(single=f"{CLS} $A {SEP}",
                                                special_tokens=[(CLS, vocab[CLS]), (SEP, vocab[SEP])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, unk_token=UNK, cls_token=CLS, sep_token=SEP, mask_token=MASK,
        bos_token=DEC, model_max_length=MAX_POSITIONS,
    )
    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tiny_blip_config(vocab: dict[str, int]) -> BlipConfig:
    return BlipConfig(
        text_config={
            "vocab_size": len(vocab), "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 37, "max_position_embeddings": MAX_POSITIONS, "pad_token_id": vocab[PAD],
            "bos_token_id": vocab[DEC], "eos_token_id": vocab[SEP], "sep_token_id": vocab[SEP],
            "initializer_range": INIT_STD,
        },
        vision_config={
            "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 37,
            "image_size": IMAGE_SIZE, "patch_size": 8, "initializer_range": INIT_STD,
        },
        projection_dim=32,
    )


def write_tiny_blip(out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random BLIP (model + processor) to out_dir and return out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    processor = build_tiny_blip_processor()
    vocab = tiny_blip_vocab()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(tiny_blip_config(vocab)).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=vocab[DEC], pad_token_id=vocab[PAD], eos_token_id=vocab[SEP], no_repeat_ngram_size=3,
        # a random model may pick tokens that decode to nothing; a real one does not
        suppress_tokens=[vocab[t] for t in (PAD, UNK, CLS, MASK, DEC)],
    )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
