"""KV storage for one layer, at KV-head granularity, with real (ragged) memory savings.

Two phases:

* prefill: :class:`DenseKV` holds ``(H_kv, T, d)`` keys/values as they arrive (chunked prefill
  appends), uncompressed, so a method can score every prompt token;
* decode, one store per layer holding only the tokens the method kept (layers may keep different
  numbers, so a smaller budget is a smaller tensor, not a mask; keys carry their rotary position,
  so eviction never shifts positions):

  - :class:`StaticKV`: ``(H_kv, capacity, d)`` buffers and a device-side fill level: a decode
    step over it has fixed shapes and no host sync (compilable, capturable). Heads of a layer
    that keep different numbers of tokens are padded to the longest (counted);
  - :class:`StaticPagedKV`: the same for heads of any size (packed, page-aligned per head, no
    padding beyond the page rounding), with per-page key summaries for sparse decoding;
  - :class:`PackedKV`: packed per head with host-side lengths, for methods whose decode step
    evicts or selects with data-dependent shapes (eager only).

Decode attention over the static stores runs :mod:`atskv.core.kernels`' native kernel on the CPU
(in fp32) and PyTorch's SDPA elsewhere. Nothing here knows about transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from atskv.core import kernels
from atskv.core.dynamo import dynamic

#: rows per block when the kernel reads every row of a head (any size gives the same result)
DENSE_BLOCK = 128


class Store(Protocol):
    """What every decode store of one layer provides (the engine, the methods' defaults and the
    byte accounting use nothing else)."""

    #: a decode step over it has fixed shapes and no host sync (compilable, capturable)
    static: bool

    @property
    def n_heads(self) -> int: ...

    def append(self, k: Tensor, v: Tensor) -> None:
        """One new token per head, ``(H_kv, d)``."""

    def attend(self, q: Tensor, scale: float) -> tuple[Tensor, int]:
        """Exact attention of ``q`` ``(H_kv, g, d)`` over every stored token: the output and the
        KV bytes it read."""

    def tensors(self) -> Sequence[Tensor]:
        """Every tensor the store holds (its bytes are the store's)."""

    def spare_bytes(self) -> int:
        """Bytes reserved for generated tokens not appended (yet)."""

    def token_bytes(self) -> int:
        """Bytes of one token's key + value in one head."""

    def total_tokens(self) -> int:
        """Tokens stored over all heads (a host sync: never inside a decode step)."""

    def truncate(self, drop: list[int]) -> None:
        """Drop each head's last ``drop[h]`` tokens (the latest positions: rows are kept in
        position order), as if they had never been stored."""


def tensor_bytes(*tensors: Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def unreached_pages(capacities: list[int], lengths: list[int], page: int) -> int:
    """Pages, over all heads, that a head's capacity spans but none of its tokens occupy yet:
    the headroom pages whose page metadata is reserved but unwritten."""
    return sum(-(-c // page) - -(-n // page) for c, n in zip(capacities, lengths))


def page_minmax(keys: Tensor, page: int) -> tuple[Tensor, Tensor]:
    """Elementwise min and max of each page of ``page`` consecutive keys: ``(..., n, d)`` ->
    two ``(..., ceil(n / page), d)``; the last page may be partial."""
    n = keys.shape[-2]
    pad = -n % page
    shape = (*keys.shape[:-2], (n + pad) // page, page, keys.shape[-1])
    lo = F.pad(keys, (0, 0, 0, pad), value=float("inf")).reshape(shape).amin(dim=-2)
    hi = F.pad(keys, (0, 0, 0, pad), value=float("-inf")).reshape(shape).amax(dim=-2)
    return lo, hi


class DenseKV:
    """Prompt keys/values during prefill, ``(H_kv, T, d)``."""

    def __init__(self) -> None:
        self.keys: Tensor | None = None
        self.values: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``(H_kv, t, d)`` and return the whole ``(H_kv, T, d)`` keys and values."""
        if self.keys is None:
            self.keys, self.values = k, v
        else:
            self.keys = torch.cat([self.keys, k], dim=1)
            self.values = torch.cat([self.values, v], dim=1)
        return self.keys, self.values

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[1]

    def nbytes(self) -> int:
        return tensor_bytes(self.keys, self.values)


class PackedKV:
    """Kept tokens of one layer, packed per KV head (see the module docstring). Its lengths are
    host-side, so a decode step over it is eager (not capturable)."""

    static = False

    def __init__(self, keys: Tensor, values: Tensor, lengths: list[int], capacities: list[int]):
        assert keys.shape == values.shape and keys.dim() == 2
        assert len(lengths) == len(capacities)
        self.k = keys  # (N, d)
        self.v = values
        self.lengths = list(lengths)
        self.capacities = list(capacities)
        self.offsets = [0]
        for c in capacities:
            self.offsets.append(self.offsets[-1] + c)
        assert self.offsets[-1] == keys.shape[0]
        self.uniform = len(set(capacities)) == 1

    @classmethod
    def from_selection(
        cls, keys: Tensor, values: Tensor, keep: list[Tensor], headroom: list[int]
    ) -> PackedKV:
        """Pack ``keys[h, keep[h]]`` for every head, with ``headroom[h]`` free rows after them.

        Args:
            keys, values: ``(H_kv, T, d)`` prefill tensors.
            keep: per head, a 1-D tensor of token indices (sorted ascending).
            headroom: per head, rows reserved for tokens appended during decoding.
        """
        n_heads, _, d = keys.shape
        keep = [k.to(keys.device) for k in keep]  # layers may sit on different GPUs
        lengths = [int(k.numel()) for k in keep]
        caps = [n + r for n, r in zip(lengths, headroom)]
        total = sum(caps)
        k_buf = keys.new_empty(total, d)
        v_buf = values.new_empty(total, d)
        off = 0
        for h in range(n_heads):
            n = lengths[h]
            k_buf[off : off + n] = keys[h].index_select(0, keep[h])
            v_buf[off : off + n] = values[h].index_select(0, keep[h])
            off += caps[h]
        return cls(k_buf, v_buf, lengths, caps)

    @property
    def n_heads(self) -> int:
        return len(self.lengths)

    def head(self, h: int) -> tuple[Tensor, Tensor]:
        """Keys and values of head ``h``: two ``(length[h], d)`` views."""
        s = self.offsets[h]
        e = s + self.lengths[h]
        return self.k[s:e], self.v[s:e]

    def dense(self) -> tuple[Tensor, Tensor] | None:
        """``(H_kv, T, d)`` views when every head has the same capacity and length, else None."""
        if not self.uniform or len(set(self.lengths)) != 1:
            return None
        h, cap, n = self.n_heads, self.capacities[0], self.lengths[0]
        d = self.k.shape[1]
        return self.k.view(h, cap, d)[:, :n], self.v.view(h, cap, d)[:, :n]

    def append(self, k: Tensor, v: Tensor) -> None:
        """Append one token per head; ``k``, ``v`` are ``(H_kv, d)``."""
        full = [h for h in range(self.n_heads) if self.lengths[h] >= self.capacities[h]]
        if full:
            raise RuntimeError(f"KV heads {full} are at capacity; the method must evict first")
        if self.uniform and len(set(self.lengths)) == 1:
            h, cap, n = self.n_heads, self.capacities[0], self.lengths[0]
            d = self.k.shape[1]
            self.k.view(h, cap, d)[:, n] = k
            self.v.view(h, cap, d)[:, n] = v
        else:
            for h in range(self.n_heads):
                row = self.offsets[h] + self.lengths[h]
                self.k[row] = k[h]
                self.v[row] = v[h]
        self.lengths = [n + 1 for n in self.lengths]

    def evict(self, h: int, index: int) -> None:
        """Remove token ``index`` of head ``h``, shifting the later ones left (order kept)."""
        s = self.offsets[h]
        n = self.lengths[h]
        if not 0 <= index < n:
            raise IndexError(f"token {index} out of range for head {h} of length {n}")
        if index < n - 1:
            self.k[s + index : s + n - 1] = self.k[s + index + 1 : s + n].clone()
            self.v[s + index : s + n - 1] = self.v[s + index + 1 : s + n].clone()
        self.lengths[h] = n - 1

    def keep_only(self, h: int, keep: Tensor) -> None:
        """Keep only tokens ``keep`` (sorted segment indices) of head ``h``."""
        s = self.offsets[h]
        n = int(keep.numel())
        self.k[s : s + n] = self.k[s + keep].clone()
        self.v[s : s + n] = self.v[s + keep].clone()
        self.lengths[h] = n

    def attend(self, q: Tensor, scale: float) -> tuple[Tensor, int]:
        """Exact attention of ``q`` ``(H_kv, g, d)`` over every stored token of each head, and
        the bytes read (every stored token)."""
        dense = self.dense()
        if dense is not None:
            out = F.scaled_dot_product_attention(q, *dense, scale=scale)
        else:
            out = torch.cat([F.scaled_dot_product_attention(q[h : h + 1], k[None], v[None],
                                                            scale=scale)
                             for h, (k, v) in enumerate(map(self.head, range(self.n_heads)))])
        return out, self.total_tokens() * self.token_bytes()

    def total_tokens(self) -> int:
        return sum(self.lengths)

    def truncate(self, drop: list[int]) -> None:
        self.lengths = [n - d for n, d in zip(self.lengths, drop, strict=True)]

    def tensors(self) -> tuple[Tensor, ...]:
        """Every tensor the store holds: keys and values, headroom included (lengths and
        offsets are host-side lists)."""
        return self.k, self.v

    def spare_bytes(self) -> int:
        """Bytes of the rows reserved for generated tokens that have not been appended (yet)."""
        return (sum(self.capacities) - sum(self.lengths)) * self.token_bytes()

    def token_bytes(self) -> int:
        """Bytes of one token's key + value in one head."""
        return 2 * self.k.shape[1] * self.k.element_size()


class StaticKV:
    """Kept tokens of one layer in preallocated ``(H_kv, capacity, d)`` buffers, with the
    decode-time state (tokens written per head) in a device tensor, so that a decode step over it
    has fixed shapes and no host synchronisation: it can be compiled (``torch.compile``,
    ``fullgraph=True``) or captured in a CUDA graph.

    Every head owns ``capacity`` rows: its kept tokens, then ``headroom`` rows for generated
    tokens (heads with fewer kept tokens are padded to the longest; the padding is allocated and
    therefore counted). Attention reads every row and masks the ones not written yet.

    ``sinks`` makes it a StreamingLLM ring: once a head is full, each new token overwrites the
    oldest non-sink row (rows ``sinks ..`` in turn). Keys carry their rotary positions, and
    attention does not depend on the order of rows, so this keeps exactly the tokens that
    evicting the oldest non-sink token and appending would keep.
    """

    static = True

    def __init__(self, keys: Tensor, values: Tensor, keep: list[Tensor], headroom: int,
                 sinks: int | None = None):
        n_heads, _, d = keys.shape
        dev = keys.device
        lengths = [int(i.numel()) for i in keep]
        self.capacity = max(lengths) + headroom
        self.k = keys.new_zeros(n_heads, self.capacity, d)
        self.v = values.new_zeros(n_heads, self.capacity, d)
        for h, idx in enumerate(keep):
            idx = idx.to(dev)  # layers may sit on different GPUs
            self.k[h, : lengths[h]] = keys[h].index_select(0, idx)
            self.v[h, : lengths[h]] = values[h].index_select(0, idx)
        dynamic(self.k, 1), dynamic(self.v, 1)  # capacities differ between generations
        self.count = torch.tensor(lengths, device=dev)  # tokens written per head
        self.sinks = sinks
        self.reserved = headroom * n_heads  # rows for generated tokens (spare until written)
        self.initial = sum(lengths)
        self.kernel = kernels.usable(self.k)  # decided (and built) here, never inside a step

    @property
    def n_heads(self) -> int:
        return self.k.shape[0]

    @property
    def counts(self) -> Tensor:
        """The tensor that holds the rows written (what :func:`decode_rows` updates)."""
        return self.count

    def append(self, k: Tensor, v: Tensor) -> None:
        """Write one token per head (``(H_kv, d)``) on the device, without a host sync."""
        slot = self.count
        cap = self.k.shape[1]  # (a tensor size, not a Python int: may be symbolic when compiled)
        if self.sinks is not None:
            slot = torch.where(self.count < cap, self.count,
                               self.sinks + (self.count - cap) % (cap - self.sinks))
        heads = torch.arange(self.n_heads, device=slot.device)
        self.k.index_put_((heads, slot), k)
        self.v.index_put_((heads, slot), v)
        self.count += 1

    def attend(self, q: Tensor, scale: float) -> tuple[Tensor, int]:
        """Attention of ``q`` ``(H_kv, g, d)`` over every written row of each head, and the
        bytes read (:meth:`read_bytes`)."""
        if self.kernel:  # reads the written rows only (the kernel caps a ring's count)
            return kernels.paged_attention(q, self.k, self.v, None, self.count, None, None,
                                           DENSE_BLOCK, scale), self.read_bytes()
        rows = torch.arange(self.k.shape[1], device=self.count.device)
        written = rows[None, :] < self.count[:, None]  # (H, capacity)
        # as one batch of H heads (the layout CPU's fused SDPA kernel takes a mask fastest in)
        return F.scaled_dot_product_attention(q[None], self.k[None], self.v[None],
                                              attn_mask=written[None, :, None, :],
                                              scale=scale)[0], self.read_bytes()

    def read_bytes(self) -> int:
        """Bytes one :meth:`attend` reads: every row of every head (masked rows included; the
        kernel skips the rows not written yet, so there it is an upper bound)."""
        return self.k.numel() * self.k.element_size() * 2

    def total_tokens(self) -> int:
        return int(self.count.clamp(max=self.capacity).sum())  # a host sync: never in a step

    def truncate(self, drop: list[int]) -> None:
        if self.sinks is not None and bool((self.count > self.capacity).any()):
            raise RuntimeError("a ring that has wrapped holds its tokens out of order")
        self.count -= torch.tensor(drop, device=self.count.device)
        self.initial -= sum(drop)
        self.reserved += sum(drop)  # free rows again, for tokens appended later

    def spare_bytes(self) -> int:
        """Bytes of the headroom rows no generated token has been written to (yet)."""
        if self.sinks is not None and self.reserved == 0:
            return 0
        written = int(self.count.sum()) - self.initial  # a host sync: never inside a decode step
        return max(0, self.reserved - written) * self.token_bytes()

    def tensors(self) -> tuple[Tensor, ...]:
        return self.k, self.v, self.count

    def token_bytes(self) -> int:
        return 2 * self.k.shape[2] * self.k.element_size()


class StaticPagedKV:
    """Kept tokens of one layer in preallocated, page-aligned per-head segments, with every piece
    of decode-time state on the device (lengths, offsets, per-page key min/max).

    Head ``h`` owns ``capacity[h]`` rows (its kept tokens plus decode headroom, rounded up to whole
    pages: at most ``page - 1`` spare rows per head) of the flat ``(N, d)`` buffers; heads stay
    ragged. Each page keeps its keys' elementwise min, max and sum (for decode-time page
    selection), unless ``bounds=False``: one summary slot per page of the buffers, so a head
    pays for the pages it owns, not for the longest head's. :meth:`append` writes through
    device index tensors and updates the page bounds without host synchronisation or
    data-dependent shapes, so a decode step that uses it can be captured once in a CUDA graph
    and replayed.
    """

    static = True

    def __init__(self, keys: Tensor, values: Tensor, keep: list[Tensor], headroom: list[int],
                 page: int, bounds: bool = True):
        n_heads, _, d = keys.shape
        dev = keys.device
        keep = [k.to(dev) for k in keep]  # layers may sit on different GPUs
        self.page = page
        lengths = [int(i.numel()) for i in keep]
        caps = [-(-(n + r) // page) * page for n, r in zip(lengths, headroom)]
        n_pages = max(caps) // page  # page slots per head (bounds are padded to this)
        self.k = keys.new_zeros(sum(caps), d)
        self.v = values.new_zeros(sum(caps), d)
        starts = [0]
        for c in caps[:-1]:
            starts.append(starts[-1] + c)
        for h in range(n_heads):
            s = starts[h]
            self.k[s : s + lengths[h]] = keys[h].index_select(0, keep[h])
            self.v[s : s + lengths[h]] = values[h].index_select(0, keep[h])
        self.reserved = sum(headroom)  # rows for generated tokens (spare until appended)
        self.initial = sum(lengths)
        #: (3, H) int64: each head's first row, token count and rows owned (``offsets``, ``lens``,
        #: ``caps`` are its rows): one tensor, so that a compiled step takes one input, not three
        self.index = torch.tensor([starts, lengths, caps], device=dev)
        self.capacities = caps
        self.kernel = kernels.usable(self.k)  # decided (and built) here, never inside a step
        #: pages a method wants attended at every step (set after construction); its shape is
        #: also where the number of page slots is read from (a tensor size, so that a compiled
        #: step treats it as a dimension, not as a constant)
        self.pinned = dynamic(torch.zeros(n_heads, n_pages, dtype=torch.bool, device=dev), 1)
        dynamic(self.k, 0), dynamic(self.v, 0)  # rows and pages differ between generations
        #: (N / page, 3, d): the key min, max and sum of every page of the buffers (head ``h``'s
        #: page ``p`` is slot ``offsets[h] / page + p``; :meth:`page_summaries` gathers them
        #: per head), one tensor for the same reason as ``index``, a page's three side by side
        #: (one stream of memory for a ranking to read)
        self.summary = None
        if not bounds:
            return
        self.summary = dynamic(keys.new_zeros((sum(caps) // page, 3, d)), 0)
        self.summary[:, 0], self.summary[:, 1] = float("inf"), float("-inf")  # no key yet
        for h in range(n_heads):
            self._summarise(h, lengths[h])

    def _summarise(self, h: int, n: int) -> None:
        """Head ``h``'s page summaries from its first ``n`` rows."""
        assert self.summary is not None
        start, d = int(self.index[0, h]), self.k.shape[1]
        seg = self.k[start : start + n]
        n_used = -(-n // self.page)
        if n_used:
            own = self.summary[start // self.page : start // self.page + n_used]
            own[:, 0], own[:, 1] = page_minmax(seg, self.page)
            own[:, 2] = F.pad(seg, (0, 0, 0, -n % self.page)).view(n_used, self.page, d).sum(1)

    def page_slots(self) -> Tensor:
        """``(H, n_pages)``: the summary slot of each head's page slot (a slot past a head's
        capacity repeats its last page's: :meth:`page_counts` says it holds no token)."""
        first = self.offsets // self.page
        last = first + self.caps // self.page - 1
        pages = torch.arange(self.n_pages, device=first.device)
        return torch.minimum(first[:, None] + pages, last[:, None])

    def page_summaries(self) -> Tensor | None:
        """``(H, n_pages, 3, d)``: each head's page slots' key min, max and sum (a copy)."""
        return None if self.summary is None else self.summary[self.page_slots()]

    @property
    def offsets(self) -> Tensor:
        return self.index[0]

    @property
    def counts(self) -> Tensor:
        """The tensor that holds the rows written (what :func:`decode_rows` updates)."""
        return self.index

    @property
    def lens(self) -> Tensor:
        return self.index[1]

    @property
    def caps(self) -> Tensor:
        return self.index[2]

    @property
    def kmin(self) -> Tensor | None:
        """``(H, n_pages, d)``: each head's page slots' key min (a copy; so are ``kmax`` and
        ``ksum``: :meth:`page_summaries` gathers all three at once)."""
        return self._per_head(0)

    @property
    def kmax(self) -> Tensor | None:
        return self._per_head(1)

    @property
    def ksum(self) -> Tensor | None:
        return self._per_head(2)

    def _per_head(self, part: int) -> Tensor | None:
        return None if self.summary is None else self.summary[self.page_slots(), part]

    @property
    def n_heads(self) -> int:
        return self.lens.shape[0]

    @property
    def n_pages(self) -> int:
        """Page slots per head (the longest head's pages)."""
        return self.pinned.shape[1]

    def append(self, k: Tensor, v: Tensor, bounds: bool = True) -> None:
        """Append one token per head (``(H_kv, d)``), on the device, without a host sync, and
        take its key into its page's summary (unless ``bounds`` is false: for a generation that
        never reads the summaries, which then no longer describe the pages past the prompt).
        Writing past a head's capacity is the caller's error (the engine sizes the headroom)."""
        rows = self.offsets + self.lens
        self.k.index_copy_(0, rows, k)
        self.v.index_copy_(0, rows, v)
        if bounds and self.summary is not None:
            self._update_bounds(k)
        self.index[1] += 1

    def _update_bounds(self, k: Tensor) -> None:
        slot = (self.offsets + self.lens) // self.page
        fresh = (self.lens % self.page == 0)[:, None]
        lo, hi, total = self.summary[slot].unbind(1)  # each (H, d)
        now = torch.stack([torch.minimum(lo, k), torch.maximum(hi, k), total + k], dim=1)
        self.summary[slot] = torch.where(fresh[..., None], k[:, None], now)

    def page_counts(self) -> Tensor:
        """Tokens held by each page slot ``(H, n_pages)`` (0 for unused slots)."""
        start = torch.arange(self.n_pages, device=self.lens.device) * self.page
        return (self.lens[:, None] - start).clamp(0, self.page)

    def token_index(self, pages: Tensor) -> tuple[Tensor, Tensor]:
        """Flat row indices of the tokens of ``pages`` ``(H, K)`` -> ``(H, K * page)`` rows and
        a validity mask (rows past a head's length are padding)."""
        in_seg = (pages[..., None] * self.page
                  + torch.arange(self.page, device=pages.device)).flatten(1)
        valid = in_seg < self.lens[:, None]
        return self.offsets[:, None] + in_seg.clamp_max(self.caps[:, None] - 1), valid

    def attend(self, q: Tensor, scale: float, pages: Tensor | None = None,
               chosen: Tensor | None = None) -> tuple[Tensor, int]:
        """Attention of ``q`` ``(H, g, d)`` over the tokens of ``pages`` ``(H, K)`` (default:
        every page slot) where ``chosen`` ``(H, K)`` (default: all), with fixed shapes: the
        pages' rows are gathered and the rows past a head's length or of unchosen pages masked.
        Returns the output and the bytes read (every row of ``pages``; the kernel skips the
        unchosen pages and rows past a head's length, so there it is an upper bound)."""
        read = self.read_bytes(pages)  # the same count on either path
        if self.kernel:  # the rows are read where they lie: no gather copy, no mask
            page = self.page if pages is not None else DENSE_BLOCK
            return kernels.paged_attention(q, self.k, self.v, self.offsets, self.lens, pages,
                                           chosen, page, scale), read
        if pages is None:
            pages = torch.arange(self.n_pages, device=q.device).expand(self.n_heads, self.n_pages)
        rows, valid = self.token_index(pages)
        if chosen is not None:
            valid = valid & chosen.repeat_interleave(self.page, dim=1)
        # as one batch of H heads, like StaticKV.attend: the layout in which a compiled step
        # keeps the fused SDPA kernel (3-D inputs are decomposed into a slow transposed gather)
        out = F.scaled_dot_product_attention(q[None], self.k[rows][None], self.v[rows][None],
                                             attn_mask=valid[None, :, None, :], scale=scale)[0]
        return out, read

    def read_bytes(self, pages: Tensor | None = None) -> int:
        """Bytes :meth:`attend` reads: every row of ``pages`` (default: every row the heads own,
        their tokens and the room left for generated ones)."""
        rows = self.k.shape[0] if pages is None else pages.numel() * self.page
        return rows * self.token_bytes()

    def decode_ranked(self, q: Tensor, k: Tensor, v: Tensor, scale: float, max_pages: int,
                      fit_pages: int, min_pages: int, mass: float) -> tuple[Tensor, int]:
        """:meth:`append` of ``k``, ``v`` ``(H, d)``, then the attention of ``q`` over the pages
        atskv's ranking chooses (every page of a head holding at most ``fit_pages``, at most
        ``max_pages`` of the others; ``ATSKV.rank_pages`` documents it), in one call of the
        native kernel ``atskv::paged_decode``. Returns what :meth:`attend` returns for the
        ranking's ``(H, min(max(max_pages, fit_pages), n_pages))`` pages."""
        assert self.kernel and self.summary is not None, "the native kernel's path only"
        out = kernels.paged_decode(q, k, v, self.k, self.v, self.summary, self.index,
                                   self.pinned, self.page, max_pages, fit_pages, min_pages, mass,
                                   scale)
        slots = self.n_heads * kernels.page_slots(max_pages, fit_pages, self.n_pages)
        return out, slots * self.page * self.token_bytes()

    def total_tokens(self) -> int:
        return int(self.lens.sum())

    def truncate(self, drop: list[int]) -> None:
        lens = [n - d for n, d in zip(self.lens.tolist(), drop, strict=True)]
        self.index[1] = torch.tensor(lens, device=self.index.device)
        self.initial -= sum(drop)
        self.reserved += sum(drop)  # free rows again, for tokens appended later
        if self.summary is not None:  # every page's summary again, from the rows it holds now
            self.summary[:, 0], self.summary[:, 1] = float("inf"), float("-inf")
            self.summary[:, 2] = 0
            for h, n in enumerate(lens):
                self._summarise(h, n)

    def spare_bytes(self) -> int:
        """Bytes of the headroom rows reserved for generated tokens not appended (yet), and of
        the page metadata (summaries, pinned flags) of headroom pages that hold no token yet;
        page rounding, and the pinned flags that pad a head to the longest head's pages, are
        not spare (they are paid for)."""
        lens = self.lens.tolist()  # a host sync: never inside a decode step
        appended = sum(lens) - self.initial
        spare = max(0, self.reserved - appended) * self.token_bytes()
        slot = self.pinned.element_size()
        if self.summary is not None:
            slot += 3 * self.summary.shape[-1] * self.summary.element_size()
        return spare + unreached_pages(self.capacities, lens, self.page) * slot

    def summary_bytes(self) -> int:
        """Bytes of every page slot's key min, max and sum (what a ranking over them reads)."""
        return 0 if self.summary is None else self.summary.numel() * self.summary.element_size()

    def tensors(self) -> tuple[Tensor, ...]:
        """Every tensor the store holds: keys, values, page summaries, pinned pages and the index
        tensors."""
        return tuple(t for t in (self.k, self.v, self.index, self.summary,
                                 self.pinned) if t is not None)

    def token_bytes(self) -> int:
        return 2 * self.k.shape[1] * self.k.element_size()


def decode_rows(rows: list[int], stores: Sequence[StaticKV | StaticPagedKV], q: Tensor,
                k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, list[int]]:
    """One layer of a decode step for the rows ``rows`` of a step (sequences), each with its own
    store of that layer (a store the kernel serves, one per row taken): row ``rows[i]``'s new key and
    value ``k[rows[i]]``, ``v[rows[i]]`` ``(H, d)`` appended to ``stores[i]`` (page summaries not
    updated), then its query ``q[rows[i]]`` ``(H, g, d)``'s exact attention over every row of
    that store, in one native call (:func:`kernels.rows_decode`). Each row gets what ``append``
    and ``attend`` give it alone. The outputs ``(len(rows), H, g, d)`` and each row's bytes
    read."""
    rings = [s.sinks if isinstance(s, StaticKV) and s.sinks is not None else -1 for s in stores]
    out = kernels.rows_decode(q, k, v, rows, [s.k for s in stores], [s.v for s in stores],
                              [s.counts for s in stores], rings, DENSE_BLOCK, scale)
    return out, [s.read_bytes() for s in stores]
