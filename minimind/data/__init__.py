"""Data sets for every training stage: JSON Lines -> token cache -> batches. See `build_loader`."""
from minimind.data.augment import ChatAugmenter, default_ratios
from minimind.data.cache import TokenCache, load_token_cache
from minimind.data.jsonl import KINDS, DataError
from minimind.data.loader import DPOLoader, Loader, PackedPretrainLoader, PromptLoader, SequenceLoader

__all__ = ["ChatAugmenter", "DataError", "DPOLoader", "KINDS", "Loader", "PackedPretrainLoader", "PromptLoader",
           "SequenceLoader", "TokenCache", "build_loader", "default_ratios", "load_token_cache"]


def build_loader(kind, path, tokenizer, *, max_seq_len, batch_size, seed=42, rank=0, world_size=1, pack=True,
                 skip_bad_records=False, cache_dir=None, drop_last=True, num_workers=None, add_system_ratio=0.0,
                 drop_empty_think_ratio=0.0, thinking_ratio=0.0) -> Loader:
    """A resumable, shardable loader over `path` (a JSON Lines file of `kind`), building or reusing its token cache.

    kind: "pretrain" | "sft" | "reason" | "dpo" | "rl". pack: pretrain rows packed full / chat batches
    length-bucketed (False: MiniMind2's pad-to-max_seq_len). num_workers: tokeniser processes for a cache build
    (None: one per core for files over 8 MiB, in-process below). Bad records raise DataError "FILE:LINE: ..." unless
    skip_bad_records (then skipped, counted in stats()["skipped_records"], and warned about). Records are checked
    by the rules of the tokenizer's chat format. add_system_ratio, drop_empty_think_ratio: MiniMind's SFT
    augmentations for the chat kinds (minimind.data.augment; default_ratios(format) gives MiniMind's values).
    thinking_ratio: rl only, the share of prompts that open a <think> block (minimind-3's template).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; choose one of {KINDS}")
    cache = load_token_cache(path, kind, tokenizer, cache_dir=cache_dir, skip_bad_records=skip_bad_records,
                             num_workers=num_workers)
    common = dict(max_seq_len=max_seq_len, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                  pack=pack, drop_last=drop_last)
    if kind == "rl":
        return PromptLoader(kind, cache, thinking_ratio=thinking_ratio, **common)
    if kind == "pretrain":
        cls = PackedPretrainLoader if pack else SequenceLoader
    else:
        cls = DPOLoader if kind == "dpo" else SequenceLoader
    augment = None
    if add_system_ratio or drop_empty_think_ratio:
        augment = ChatAugmenter(tokenizer, add_system_ratio, drop_empty_think_ratio)
    return cls(kind, cache, augment=augment, **common)
