"""Batches from a token cache: packed or padded, length-bucketed, shuffled per epoch, resumable, sharded for DDP.

Every loader first makes an epoch's *plan*: the list of global batches (arrays of item indices), a function of
(seed, epoch, batch_size, max_seq_len) only, never of the world size. Rank r of W takes global batches
r, r + W, r + 2W, ...; the position is the number of global batches consumed, so a run stopped after g batches
resumes at batch g under any world size. To keep ranks in lockstep, each rank stops when fewer than W global
batches remain (at most W - 1 tail batches of an epoch are left out; none when W divides the count).

Items and rows (T <= max_seq_len; all tensors int64, (B, T)):
    pretrain, pack=True   the cache's token stream (documents back to back, each <|im_start|> text <|im_end|>) cut
                          into rows of exactly max_seq_len; labels = input_ids; no padding. The stream's last
                          partial row is dropped (fewer than max_seq_len tokens, reported as dropped_tokens).
                          Documents may span two rows; attention is not masked at document boundaries.
    pretrain, pack=False  MiniMind2: one document per row, truncated and padded to max_seq_len, labels -100 on pads.
    sft / reason          one conversation per row, truncated; labels = ids on assistant tokens, else -100.
    dpo                   chosen and rejected padded to one T; labels as for sft.
    rl                    not rows but prompts (PromptLoader): each record's generation prompt, its last
                          max_seq_len tokens (MiniMind keeps the end, where the assistant turn opens), as id lists.
With pack=True the chat kinds are length-bucketed: each epoch's shuffled items are cut into mega-batches of
BUCKET_BATCHES batches, sorted by length inside each, cut into batches, and the batch order shuffled, so each
batch pads to its own longest row and little padding remains. pack=False pads every row to max_seq_len, in a plainly
shuffled order (MiniMind2's behaviour, for comparison). Chat items whose truncated form has no assistant token (no
loss) are left out and counted (no_target_sequences).

sft / reason with an `augment` (minimind.data.augment.ChatAugmenter: a system prompt added, empty think blocks
dropped): each row is its item's variant drawn from (seed, epoch, item), so batches stay exactly reproducible and
resumable. Plans, bucketing and stats() use the stored lengths; a variant whose truncation would lose every target
is replaced by the stored sequence.
"""
from typing import Dict, List, Optional

import numpy as np
import torch

from minimind.data.augment import ChatAugmenter
from minimind.data.cache import TokenCache

BUCKET_BATCHES = 64  # batches per mega-batch sorted by length
IGNORE = -100


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


def _cut(order: np.ndarray, batch_size: int, drop_last: bool) -> List[np.ndarray]:
    n = len(order) - len(order) % batch_size if drop_last else len(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def random_batches(items: np.ndarray, batch_size: int, rng, drop_last: bool) -> List[np.ndarray]:
    return _cut(rng.permutation(items), batch_size, drop_last)


def bucketed_batches(items: np.ndarray, lengths: np.ndarray, batch_size: int, rng, drop_last: bool,
                     bucket_batches: int = BUCKET_BATCHES) -> List[np.ndarray]:
    """Shuffle, sort by length within mega-batches of bucket_batches * batch_size items, cut, shuffle the batches.
    lengths is indexed by item id."""
    order = rng.permutation(items)
    if drop_last:
        order = order[:len(order) - len(order) % batch_size]
    mega = bucket_batches * batch_size
    batches = []
    for i in range(0, len(order), mega):
        chunk = order[i:i + mega]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(_cut(chunk, batch_size, False))
    return [batches[i] for i in rng.permutation(len(batches))]


class Loader:
    """Iterates this rank's batches of the current epoch from the saved position. See the module docstring."""

    def __init__(self, kind: str, cache: TokenCache, *, max_seq_len: int, batch_size: int, seed: int = 42,
                 rank: int = 0, world_size: int = 1, pack: bool = True, drop_last: bool = True,
                 augment: Optional[ChatAugmenter] = None):
        if max_seq_len < 2 or batch_size < 1:
            raise ValueError(f"max_seq_len must be >= 2 and batch_size >= 1, got {max_seq_len}, {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.kind, self.cache = kind, cache
        self.max_seq_len, self.batch_size, self.seed = max_seq_len, batch_size, seed
        self.rank, self.world_size, self.pack, self.drop_last = rank, world_size, pack, drop_last
        if augment is not None and not augment.active:
            augment = None
        if augment is not None and cache.extras is None:
            raise ValueError(f"{kind} data cannot be augmented (only the chat kinds sft and reason)")
        self.augment = augment
        self.epoch, self.position = 0, 0
        self._plan_epoch, self._plan = None, None
        self._setup()

    # -- what each kind defines --
    def _setup(self):
        raise NotImplementedError

    def _make_plan(self, rng) -> List[np.ndarray]:
        raise NotImplementedError

    def _collate(self, batch: np.ndarray) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def _batch_tokens(self, batch: np.ndarray):
        """(useful tokens, padded tokens) of one batch, without building it."""
        raise NotImplementedError

    # -- shared --
    def plan(self, epoch=None) -> List[np.ndarray]:
        """The global batches of an epoch (item indices), identical on every rank and for every world size."""
        epoch = self.epoch if epoch is None else epoch
        if self._plan_epoch != epoch:
            self._plan, self._plan_epoch = self._make_plan(_rng(self.seed, epoch)), epoch
        return self._plan

    @property
    def num_global_batches(self) -> int:
        return len(self.plan())

    def __len__(self):
        return self.num_global_batches // self.world_size

    def _stop(self, start: int) -> int:
        n = self.num_global_batches
        return start + self.world_size * max(0, (n - start) // self.world_size)

    def __iter__(self):
        plan = self.plan()
        for g in range(self.position + self.rank, self._stop(self.position), self.world_size):
            batch = self._collate(plan[g])
            self.position = g - self.rank + self.world_size
            yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def every_batch(self):
        """This rank's share of EVERY global batch of the current epoch, the tail included (r, r + W, ... to the
        end), without touching the position: for one pass over the whole data set (DPO's precomputed reference).
        Ranks may get one batch more than others, so this is not for training in lockstep."""
        plan = self.plan()
        for g in range(self.rank, len(plan), self.world_size):
            yield self._collate(plan[g])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its shuffle); keeps the position when it is already the current epoch (resume)."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    @property
    def augment_ratios(self):
        """(add_system_ratio, drop_empty_think_ratio), (0, 0) without augmentation."""
        a = self.augment
        return [0.0, 0.0] if a is None else [a.add_system_ratio, a.drop_empty_think_ratio]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "batch_size": self.batch_size,
                "max_seq_len": self.max_seq_len, "num_global_batches": self.num_global_batches,
                "world_size": self.world_size, "kind": self.kind, "pack": self.pack,
                "augment_ratios": self.augment_ratios}

    def load_state_dict(self, state: dict) -> None:
        """Continue at exactly the next global batch of the saved run (any world size)."""
        for key in ("seed", "batch_size", "max_seq_len", "kind", "pack", "augment_ratios"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has "
                                 f"{getattr(self, key)!r}; the saved position would mean other batches")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if state.get("num_global_batches", self.num_global_batches) != self.num_global_batches:
            raise ValueError(f"loader state was saved with {state['num_global_batches']} batches per epoch, this "
                             f"data gives {self.num_global_batches}; the data or its settings changed")

    def stats(self) -> dict:
        """This rank's epoch: useful tokens, padding share, and what the data set left out."""
        plan, useful, padded = self.plan(), 0, 0
        for g in range(self.rank, self._stop(0), self.world_size):
            u, p = self._batch_tokens(plan[g])
            useful, padded = useful + u, padded + p
        out = {"kind": self.kind, "batches": len(self), "tokens": int(useful), "padded_tokens": int(padded),
               "padding_fraction": float((padded - useful) / padded) if padded else 0.0,
               "records": self.cache.meta["records"], "skipped_records": self.cache.meta["skipped_records"]}
        out.update(self._extra_stats())
        return out

    def _extra_stats(self) -> dict:
        return {}


class PackedPretrainLoader(Loader):
    def _setup(self):
        self.rows = len(self.cache.tokens) // self.max_seq_len

    def _make_plan(self, rng):
        return random_batches(np.arange(self.rows), self.batch_size, rng, self.drop_last)

    def _collate(self, batch):
        L, tokens = self.max_seq_len, self.cache.tokens
        ids = torch.from_numpy(np.stack([tokens[r * L:(r + 1) * L] for r in batch]).astype(np.int64))
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    def _batch_tokens(self, batch):
        n = len(batch) * self.max_seq_len
        return n, n

    def _extra_stats(self):
        return {"dropped_tokens": int(len(self.cache.tokens) - self.rows * self.max_seq_len)}


class SequenceLoader(Loader):
    """One cache sequence per row (pretrain pack=False, sft, reason), truncated to max_seq_len."""

    def _setup(self):
        self.lengths = np.minimum(self.cache.lengths, self.max_seq_len)
        self.items = np.arange(len(self.lengths))
        if self.cache.first_target is not None:  # leave out rows whose truncation lost every target
            self.items = self.items[self.cache.first_target < self.lengths]

    def _make_plan(self, rng):
        if self.pack and self.kind != "pretrain":
            return bucketed_batches(self.items, self.lengths, self.batch_size, rng, self.drop_last)
        return random_batches(self.items, self.batch_size, rng, self.drop_last)

    def _row_len(self, batch):
        return int(self.lengths[batch].max()) if self.pack and self.kind != "pretrain" else self.max_seq_len

    def _fill(self, rows, T):
        """(ids, labels, attention_mask) int64 (len(rows), T): each row's truncated sequence, right-padded.
        One gather from the cache for the whole batch: token k of row j sits at offsets[rows[j]] + k."""
        c, B = self.cache, len(rows)
        lens = self.lengths[rows]
        row = np.repeat(np.arange(B), lens)
        col = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
        src = np.repeat(c.offsets[rows], lens) + col
        tokens = c.tokens[src].astype(np.int64)  # int64 before -100 appears (it would wrap in uint16)
        ids = np.zeros((B, T), dtype=np.int64)
        labels = np.full((B, T), IGNORE, dtype=np.int64)
        attn = np.zeros((B, T), dtype=np.int64)
        ids[row, col] = tokens
        attn[row, col] = 1
        labels[row, col] = tokens if c.mask is None else np.where(c.mask[src] == 1, tokens, IGNORE)
        return ids, labels, attn

    def _augmented_rows(self, batch):
        """(tokens, mask) of each item's drawn variant (see the module docstring), truncated to max_seq_len."""
        rows, L, a = [], self.max_seq_len, self.augment
        for i in batch:
            tokens, mask = self.cache.sequence(int(i))
            system, drop = a.draw(self.seed, self.epoch, int(i))
            t, m = a.apply(tokens, mask, self.cache.extras, int(i), system, drop)
            if not m[:L].any():
                t, m = tokens, mask
            rows.append((np.asarray(t[:L], dtype=np.int64), np.asarray(m[:L])))
        return rows

    def _collate(self, batch):
        if self.augment is None:
            ids, labels, attn = self._fill(batch, self._row_len(batch))
        else:
            rows = self._augmented_rows(batch)
            T = max(len(t) for t, _ in rows) if self.pack else self.max_seq_len
            ids = np.zeros((len(rows), T), dtype=np.int64)
            labels = np.full((len(rows), T), IGNORE, dtype=np.int64)
            attn = np.zeros((len(rows), T), dtype=np.int64)
            for r, (t, m) in enumerate(rows):
                ids[r, :len(t)], attn[r, :len(t)] = t, 1
                labels[r, :len(t)] = np.where(m == 1, t, IGNORE)
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                "attention_mask": torch.from_numpy(attn)}

    def _batch_tokens(self, batch):
        return int(self.lengths[batch].sum()), len(batch) * self._row_len(batch)

    def _extra_stats(self):
        return {"sequences": len(self.items), "truncated_sequences": int((self.cache.lengths > self.max_seq_len).sum()),
                "no_target_sequences": int(len(self.lengths) - len(self.items))}


class DPOLoader(SequenceLoader):
    """Item j is the pair (sequence 2j chosen, 2j + 1 rejected); both padded to one T. `pair_index` (B,) names
    each row's pair (its record number), so per-pair values computed once can be looked up on the device."""

    def _setup(self):
        self.lengths = np.minimum(self.cache.lengths, self.max_seq_len)
        self.pair_lengths = np.maximum(self.lengths[0::2], self.lengths[1::2])
        has = self.cache.first_target < self.lengths
        self.items = np.flatnonzero(has[0::2] & has[1::2])

    def _make_plan(self, rng):
        if self.pack:
            return bucketed_batches(self.items, self.pair_lengths, self.batch_size, rng, self.drop_last)
        return random_batches(self.items, self.batch_size, rng, self.drop_last)

    def _row_len(self, batch):
        return int(self.pair_lengths[batch].max()) if self.pack else self.max_seq_len

    def _collate(self, batch):
        T, out = self._row_len(batch), {}
        for name, rows in (("chosen", 2 * batch), ("rejected", 2 * batch + 1)):
            ids, labels, attn = self._fill(rows, T)
            out[f"{name}_input_ids"] = torch.from_numpy(ids)
            out[f"{name}_labels"] = torch.from_numpy(labels)
            out[f"{name}_attention_mask"] = torch.from_numpy(attn)
        out["pair_index"] = torch.from_numpy(batch.astype(np.int64))
        return out

    def _batch_tokens(self, batch):
        useful = int(self.lengths[2 * batch].sum() + self.lengths[2 * batch + 1].sum())
        return useful, 2 * len(batch) * self._row_len(batch)

    def _extra_stats(self):
        return {"pairs": len(self.items), "truncated_sequences": int((self.cache.lengths > self.max_seq_len).sum()),
                "no_target_pairs": int(len(self.pair_lengths) - len(self.items))}


class PromptLoader(Loader):
    """rl: item j is record j's prompt for the RL stages to roll out. A batch is {"prompt_index" (B,) the records,
    "prompts" [B id lists], "thinking" [B bools], "records" [B dicts: messages, tools, answer]}. With a tokenizer
    whose template switches thinking, each item's prompt opens a <think> block with probability thinking_ratio,
    drawn from (seed, epoch, item) like the SFT augmentations, so batches stay reproducible and resumable."""

    def __init__(self, kind, cache, *, thinking_ratio: float = 0.0, **kw):
        if not 0.0 <= thinking_ratio <= 1.0:
            raise ValueError(f"thinking_ratio must be in [0, 1], got {thinking_ratio}")
        if thinking_ratio > 0 and cache.meta.get("variants", 1) < 2:
            raise ValueError(f"thinking_ratio {thinking_ratio}: this tokenizer's chat template cannot switch thinking")
        self.thinking_ratio = float(thinking_ratio)
        super().__init__(kind, cache, **kw)

    def _setup(self):
        self.variants = self.cache.meta.get("variants", 1)
        self.full_lengths = self.cache.lengths[0::self.variants]  # thinking off
        self.lengths = np.minimum(self.full_lengths, self.max_seq_len)
        self.items = np.arange(len(self.lengths))

    def _make_plan(self, rng):
        return random_batches(self.items, self.batch_size, rng, self.drop_last)

    def thinking(self, item: int) -> bool:
        """Whether item's prompt opens a <think> block this epoch."""
        return self.thinking_ratio > 0 and bool(np.random.default_rng([self.seed, self.epoch, item, 1]).random()
                                                < self.thinking_ratio)

    def _collate(self, batch):
        thinking = [self.thinking(int(i)) for i in batch]
        prompts = [self.cache.sequence(int(i) * self.variants + int(t))[0][-self.max_seq_len:].tolist()
                   for i, t in zip(batch, thinking)]
        return {"prompt_index": torch.from_numpy(batch.astype(np.int64)), "prompts": prompts, "thinking": thinking,
                "records": [self.cache.extras[int(i)] for i in batch]}

    def _batch_tokens(self, batch):
        n = int(self.lengths[batch].sum())
        return n, n

    def state_dict(self) -> dict:
        return {**super().state_dict(), "thinking_ratio": self.thinking_ratio}

    def load_state_dict(self, state: dict) -> None:
        if state.get("thinking_ratio", self.thinking_ratio) != self.thinking_ratio:
            raise ValueError(f"loader state has thinking_ratio={state['thinking_ratio']!r} but this loader has "
                             f"{self.thinking_ratio!r}; the saved position would mean other prompts")
        super().load_state_dict(state)

    def _extra_stats(self):
        meta = self.cache.meta
        return {"prompts": len(self.items), "truncated_prompts": int((self.full_lengths > self.max_seq_len).sum()),
                "records_without_answer": meta["records_without_answer"]}
