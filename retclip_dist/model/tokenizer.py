"""The text tower's tokenizer, from a plain WordPiece vocab.txt or a saved HF tokenizer directory."""

from __future__ import annotations

from pathlib import Path

from tokenizers.implementations import BertWordPieceTokenizer
from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerBase

from retclip_dist.model.config import ModelConfig
from retclip_dist.model.towers import text_model_config
from retclip_dist.model.vocab import read_vocab


def wordpiece_tokenizer(vocab: dict[str, int]) -> BertTokenizerFast:
    """Lower-casing BERT WordPiece tokenizer over an in-memory vocab ([CLS] text [SEP])."""
    # BertTokenizerFast(vocab=dict) exists only from transformers 5; a tokenizers object works in 4.x and
    # 5.x alike and encodes identically (tests/test_model.py checks both against fixed ids).
    backend = BertWordPieceTokenizer(vocab, lowercase=True)._tokenizer
    return BertTokenizerFast(
        tokenizer_object=backend,
        do_lower_case=True,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
    )


def build_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """Fast tokenizer from cfg.tokenizer_path (or cfg.text_path), checked against the text tower's vocab."""
    source = cfg.tokenizer_path or cfg.text_path
    if source is None:
        raise ValueError("model.tokenizer_path and model.text_path are both unset; the tokenizer needs one")
    path = Path(source)
    if path.is_file():
        tokenizer = wordpiece_tokenizer(read_vocab(path))
    elif path.is_dir():
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    else:
        raise FileNotFoundError(f"tokenizer source {path} is neither a vocab file nor a directory")
    vocab_size = text_model_config(cfg).vocab_size
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"tokenizer {path} has {len(tokenizer)} tokens but the text tower embeds only {vocab_size}; "
            "ids past the table would crash the embedding lookup"
        )
    return tokenizer
