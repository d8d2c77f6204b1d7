"""A tiny PixArtAlphaPipeline built in code from a fixed seed (T5 encoder, word-level tokenizer, AutoencoderKL,
DPM-Solver): a real diffusers pipeline for integration tests, with nothing downloaded."""

from __future__ import annotations

from typing import Any

import torch

CALIBRATION_PROMPTS = [
    "a photo of a cat", "a red car on the street", "a small house with a blue door", "a dog in the park",
    "a green tree under the sky", "a big red apple", "a cat with a hat", "a blue car near a tree",
]
EVAL_PROMPTS = ["a photo of a dog", "a red house", "a tree in the park", "a small blue car"]
_VOCABULARY = sorted({word for prompt in CALIBRATION_PROMPTS + EVAL_PROMPTS for word in prompt.split()})
IMAGE_SIZE = 32
MAX_TOKENS = 16


def build_tiny_pixart_pipeline(seed: int = 0):
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{word: i + 3 for i, word in enumerate(_VOCABULARY)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=MAX_TOKENS)
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                           num_heads=4, decoder_start_token_id=0)).eval()
    transformer = PixArtTransformer2DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=4,
        cross_attention_dim=64, caption_channels=32, sample_size=IMAGE_SIZE // 2, patch_size=2,
        norm_type="ada_norm_single", use_additional_conditions=False,
    ).eval()
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=IMAGE_SIZE).eval()
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs() -> dict[str, Any]:
    """Arguments the tiny pipeline needs on every call (size, token length, no caption cleaning)."""
    return dict(height=IMAGE_SIZE, width=IMAGE_SIZE, max_sequence_length=MAX_TOKENS, clean_caption=False,
                use_resolution_binning=False)
