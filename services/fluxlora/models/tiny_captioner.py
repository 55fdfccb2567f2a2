"""A tiny randomly initialised Florence-2 with its processor, written like a real checkpoint.

Captioning code and tests load it with the same `from_pretrained` calls that load the converted
microsoft/Florence-2 checkpoints, so the whole path (processor prompts, image tokens, generate,
decode, post-processing) runs offline in a fraction of a second. Its captions are word salad
drawn from a small caption vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.processors import TemplateProcessing
from transformers import (
    BartConfig,
    CLIPImageProcessorPil,
    Florence2Config,
    Florence2ForConditionalGeneration,
    Florence2Processor,
    Florence2VisionConfig,
    GenerationConfig,
    PreTrainedTokenizerFast,
)

from fluxlora.models.tiny_tokenizers import CAPTION_WORDS, PUNCTUATION

# Bart's special-token ids, which Florence-2's text side keeps: <s>=0 <pad>=1 </s>=2 <unk>=3.
BOS, PAD, EOS, UNK, MASK, IMAGE = "<s>", "<pad>", "</s>", "<unk>", "<mask>", "<image>"
SPECIAL_TOKENS = [BOS, PAD, EOS, UNK, MASK, IMAGE]

# The processor replaces task tokens such as <CAPTION> with these sentences before tokenizing,
# so their words must be in the vocabulary or every prompt would become <unk>.
PROMPT_WORDS = """
what does the image describe in detail is shown with a paragraph text regions locate objects
category name their descriptions region proposals
"""

IMAGE_SIZE = 64
# Two stages with strides 4 and 2 turn 64x64 pixels into an 8x8 grid, and Florence-2 prepends
# one pooled token: 65 image tokens (a real 768x768 model has 24x24 + 1 = 577).
IMAGE_SEQ_LENGTH = (IMAGE_SIZE // 8) ** 2 + 1
MAX_POSITIONS = 256

# A larger initialisation than the usual 0.02 makes a random model's output depend on the image
# and vary from token to token; at 0.02 it repeats one word whatever it is shown.
INIT_STD = 0.5

# Florence2Processor.post_process_generation looks up the parse rules of a task's answer type;
# captions only need "pure_text", the rest keep the processor usable for other tasks.
POST_PROCESSOR_CONFIG = {
    "ocr": {
        "pattern": r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>",
        "area_threshold": 0.0,
    },
    "phrase_grounding": {"banned_grounding_tokens": ["the image", "image", "the", "a", "an"]},
    "pure_text": {},
    "description_with_bboxes": {},
    "description_with_polygons": {},
    "polygons": {},
    "bboxes": {},
    "description_with_bboxes_or_polygons": {},
}


def tiny_florence2_vocab() -> dict[str, int]:
    words = (PROMPT_WORDS + CAPTION_WORDS).split()
    tokens = list(dict.fromkeys(SPECIAL_TOKENS + words + PUNCTUATION))
    return {token: index for index, token in enumerate(tokens)}


def build_tiny_florence2_tokenizer() -> PreTrainedTokenizerFast:
    vocab = tiny_florence2_vocab()
    tokenizer = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    # WordPiece's decoder joins words with spaces and, with cleanup, glues punctuation back on
    # ("dog , cat" -> "dog, cat"), which a bare WordLevel model cannot do.
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer.post_processor = TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} {EOS} $B {EOS}",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        mask_token=MASK,
        # Florence2Processor reads tokenizer.image_token / image_token_id, as the converted
        # checkpoints provide them.
        extra_special_tokens={"image_token": IMAGE},
        model_max_length=MAX_POSITIONS,
    )


def build_tiny_florence2_processor() -> Florence2Processor:
    image_processor = CLIPImageProcessorPil(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=3,
        do_center_crop=False,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        do_normalize=True,
        # Florence-2 normalises with ImageNet statistics, not CLIP's.
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_convert_rgb=True,
        image_seq_length=IMAGE_SEQ_LENGTH,
    )
    return Florence2Processor(
        image_processor=image_processor,
        tokenizer=build_tiny_florence2_tokenizer(),
        post_processor_config=POST_PROCESSOR_CONFIG,
    )


def tiny_florence2_config(vocab_size: int, image_token_id: int) -> Florence2Config:
    vision = Florence2VisionConfig(
        depths=[1, 1],
        patch_size=[7, 3],
        patch_stride=[4, 2],
        patch_padding=[3, 1],
        patch_prenorm=[False, True],
        embed_dim=[16, 32],
        num_heads=[2, 4],
        num_groups=[2, 4],
        window_size=4,
        drop_path_rate=0.0,
        projection_dim=32,
        initializer_range=INIT_STD,
    )
    text = BartConfig(
        vocab_size=vocab_size,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=MAX_POSITIONS,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        init_std=INIT_STD,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    return Florence2Config(
        text_config=text,
        vision_config=vision,
        image_token_id=image_token_id,
        initializer_range=INIT_STD,
    )


def write_tiny_florence2(out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random Florence-2 (model + processor) to out_dir and return out_dir.

    The same seed gives byte-identical weights. The global torch RNG is left as it was.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    processor = build_tiny_florence2_processor()
    tokenizer = processor.tokenizer
    config = tiny_florence2_config(len(tokenizer), tokenizer.image_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Florence2ForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        # As in the real checkpoints' generation config.
        no_repeat_ngram_size=3,
        # A random model happily emits <pad>, <unk> or <image>, which decode to nothing; a real
        # model never does, so suppressing them only keeps the tiny captions readable.
        suppress_tokens=[tokenizer.convert_tokens_to_ids(t) for t in (BOS, PAD, UNK, MASK, IMAGE)],
    )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
