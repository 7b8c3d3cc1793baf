"""The KV cache of generation: preallocated keys and values, one row per sequence, each row with its own length.

    cache = KVCache(config, max_batch, max_len, dtype, device)
    k, v (layers, max_batch, max_len, Hkv, D): row b holds its sequence's token t at slot t, which is position t
    lengths: how many tokens each row holds (a Python list: the host decides what runs, without a device sync)

A forward on the cache, `model.model(input_ids, cache=cache)`, runs in the mode set just before it:

    prefill(start, lengths)  rows start .. start + n take n right-padded prompts (n, T), at positions 0 .. T-1.
                             Attention is plain causal among those tokens: a real token never sees the pads after it.
                             Keys and values go to slots 0 .. T-1 (a pad's are masked out below, then overwritten
                             as its row grows); row b's length becomes lengths[b].
    decode(n)                rows 0 .. n-1 take one token each, at position lengths[b]. Its key and value go to slot
                             lengths[b]; attention reads slots [0, max length + 1) as views of the buffers, with a
                             key mask slot <= lengths[b]; every length grows by one.

The model asks `positions_for(input_ids.shape)` for each token's rotary position (B * T,), once per forward, and
`layer(i).attend(q, k, v)` for attention.
Rows are independent: the engine (minimind/generate.py) keeps the running rows at 0 .. n-1 by moving the last row
into a finished one (`move`), so no step reads a finished row and decode never copies the cache. The buffers start
at zero: a slot is masked before it is written, and a masked slot must hold a finite value (0 * NaN is NaN).
"""
import torch
import torch.nn.functional as F


class KVCache:
    def __init__(self, config, max_batch: int, max_len: int, dtype=torch.float32, device="cpu"):
        if max_batch < 1 or max_len < 1:
            raise ValueError(f"KVCache needs max_batch >= 1 and max_len >= 1, got {max_batch}, {max_len}")
        if max_len > config.max_position_embeddings:
            raise ValueError(f"KVCache max_len {max_len} exceeds the model's max_position_embeddings "
                             f"{config.max_position_embeddings}")
        shape = (config.num_hidden_layers, max_batch, max_len, config.num_key_value_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_batch, self.max_len, self.device = max_batch, max_len, torch.device(device)
        self.gqa = config.num_key_value_heads != config.num_attention_heads
        self.lengths = [0] * max_batch
        self._layers = [_Layer(self, k, v) for k, v in zip(self.k, self.v)]
        self._mode, self._shape = None, None

    def prefill(self, start: int, lengths):
        """The next forward takes right-padded prompts of these lengths into rows start .. start + len(lengths)."""
        n, T = len(lengths), max(lengths)
        if start < 0 or start + n > self.max_batch or min(lengths) < 1 or T > self.max_len:
            raise ValueError(f"prefill of rows {start}..{start + n - 1} with lengths {min(lengths)}..{T} does not "
                             f"fit the cache (max_batch {self.max_batch}, max_len {self.max_len})")
        self._mode, self._rows, self._shape = "prefill", slice(start, start + n), (n, T)
        self.positions = torch.arange(T, device=self.device).repeat(n)
        self.lengths[start:start + n] = list(lengths)

    def decode(self, n: int):
        """The next forward takes one token for each of rows 0 .. n-1, each at its row's length."""
        pos = self.lengths[:n]
        if not 1 <= n <= self.max_batch or max(pos) >= self.max_len:
            raise ValueError(f"decode of {n} rows at positions up to {max(pos, default=0)} does not fit the cache "
                             f"(max_batch {self.max_batch}, max_len {self.max_len})")
        self._mode, self._rows, self._shape = "decode", slice(0, n), (n, 1)
        self.positions = torch.tensor(pos, device=self.device)
        self._slots = torch.tensor([b * self.max_len + p for b, p in enumerate(pos)], device=self.device)
        self._span = max(pos) + 1
        seen = torch.arange(self._span, device=self.device) <= self.positions[:, None]
        # additive (0 / -inf) rather than boolean: SDPA would convert a boolean mask in every layer
        self._mask = torch.zeros(seen.shape, dtype=self.k.dtype, device=self.device).masked_fill_(
            ~seen, float("-inf"))[:, None, None, :]
        self.lengths[:n] = [p + 1 for p in pos]

    def positions_for(self, shape):
        """The positions (B * T,) of the tokens of the forward about to run, whose input_ids have this shape."""
        if tuple(shape) != self._shape:
            raise RuntimeError(f"KVCache: a forward of input_ids {tuple(shape)} needs prefill(...) or decode(n) for "
                               f"that shape just before it (set: {self._shape}; decode takes one token per row)")
        self._shape = None  # one forward per prefill / decode
        return self.positions

    def move(self, src: int, dst: int):
        """Row src's tokens become row dst's (src is left as it was)."""
        n = self.lengths[src]
        self.k[:, dst, :n] = self.k[:, src, :n]
        self.v[:, dst, :n] = self.v[:, src, :n]
        self.lengths[dst] = n

    def layer(self, i: int):
        """Layer i's part of the cache: what its Attention calls."""
        return self._layers[i]


class _Layer:
    """One layer's keys and values (max_batch, max_len, Hkv, D), views of the cache's buffers."""
    __slots__ = ("cache", "k", "v")

    def __init__(self, cache, k, v):
        self.cache, self.k, self.v = cache, k, v

    @torch.compiler.disable  # (compiled blocks: its step-dependent slicing would recompile every step)
    def attend(self, q, k, v):
        """Store k, v (B, T, Hkv, D) for this forward's tokens and attend q (B, T, Hq, D) over their rows.
        Returns (B, T, Hq, D) in q's dtype."""
        cache, dtype = self.cache, self.k.dtype
        if cache._mode == "prefill":
            T = q.shape[1]
            self.k[cache._rows, :T] = k
            self.v[cache._rows, :T] = v
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, enable_gqa=cache.gqa)
            return out.transpose(1, 2)
        (n, _, Hq, D), Hkv, out_dtype = q.shape, k.shape[2], q.dtype
        if q.dtype != dtype:  # (a model run under autocast)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        self.k.view(-1, Hkv, D).index_copy_(0, cache._slots, k.reshape(n, Hkv, D))
        self.v.view(-1, Hkv, D).index_copy_(0, cache._slots, v.reshape(n, Hkv, D))
        keys, values = self.k[:n, :cache._span], self.v[:n, :cache._span]  # views, no copy
        # one query per row: the query heads sharing a key/value head (heads j*G .. j*G+G-1 share j) stand in for
        # G query positions of that head, so GQA needs no repeated keys and any SDPA backend takes the mask
        out = F.scaled_dot_product_attention(q.reshape(n, Hkv, Hq // Hkv, D), keys.transpose(1, 2),
                                             values.transpose(1, 2), attn_mask=cache._mask)
        return out.view(n, 1, Hq, D).to(out_dtype)
