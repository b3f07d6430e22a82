"""The KV cache of cached generation: text K/V for SA layers, one window for fused layers.

What each kind of layer keeps, per sample (DESIGN.md, "Inference"):

    SA layers          every past token of the stream: text only for CA/CASA, text *and*
                       image tokens for insertion / Q-Former (which is why they grow per frame)
    CASA layers        the current window: [image keys the window sees | its text keys so far];
                       an image opens the sample's next window, which sees what the strategy's
                       window rule says (`WindowedFusion.visible_windows`; CASA's: the images
                       that opened it, so the old window is dropped); with eq. 3's indicator
                       (CASA⊕/→) a window that sees no image keeps no key at all
    CA layers          the image keys of the current window only

A forward over a *chunk* (new tokens of every cached sample, possibly with images) calls
`self_attention` / `window` from inside the layers; the cache returns the keys the chunk's
queries must see, laid out per segment so that `varlen_attention`'s bottom-right causal
alignment holds (the chunk's queries are the last keys of their segment), and stores the
new state. Samples can be dropped when they finish (`keep`).

Positions: `offset[s]` is the position the next token of sample s takes (text positions
for windowed strategies, merged-stream positions for insertion); the model adds it to the
chunk's local positions and advances it after each forward.

Context limit (`casa.context_limit.ContextPolicy`, `KVCache.trim`): a live stream adds text
every frame, so the SA cache would grow without bound and its positions would pass
`max_position_embeddings`. The policy keeps the stream's opening tokens (the prompt: the instruction, and the first
keys every later query attends to, StreamingLLM's "attention sink") and the most recent
tokens, and drops the middle. Kept keys were rotated by RoPE at their old positions; the
tail's keys (and the open window's, image keys included) are rotated back by the number of
dropped tokens (RoPE is a rotation per frequency: R(p - d) = R(-d) R(p)), so every kept key
sits at the position it would have had if the dropped tokens had never been there, and the
next token takes position `keep_first + keep_last`. Nothing is re-run: the kept keys' values
were computed while the dropped tokens were visible (the same approximation as any
windowed KV cache), positions stay below the limit, and memory is bounded.

Under `flash`, the SA layers of a cache of several samples keep all samples in one buffer
per layer (`_FlashRows`): a decoding step, where every sample has the same number of new
tokens, hands that buffer to `flash_attn_with_kvcache` (`casa.attention.CachedKV`) instead of
concatenating every sample's past per layer per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from casa.attention import CachedKV, DecodeKV, flash_dtype
from casa.batch import continues_open_window, window_samples
from casa.context import WindowIndex


def _name(backend) -> str:
    """A backend's name: the layers pass their bound `casa.attention.AttentionBackend`, tests a name."""
    return backend if isinstance(backend, str) else backend.name


@dataclass
class _FlashRows:
    """One SA layer's cache for `flash` with several samples: sample s's keys are
    k[s, :lens[s]] (k, v [S, cap, Hkv, D] in flash's dtype; lens host ints)."""

    k: torch.Tensor
    v: torch.Tensor
    lens: list[int]

    def grow(self, need: int) -> None:
        """Room for `need` keys per row: capacity doubles with one copy (amortised O(1) per token)."""
        cap = self.k.shape[1]
        if need <= cap:
            return
        cap = max(need, 2 * cap)
        k, v = self.k.new_empty(self.k.shape[0], cap, *self.k.shape[2:]), self.v.new_empty(
            self.v.shape[0], cap, *self.v.shape[2:])
        n = max(self.lens, default=0)
        k[:, :n], v[:, :n] = self.k[:, :n], self.v[:, :n]
        self.k, self.v = k, v

    def views(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.k[s, :n], self.v[s, :n]) for s, n in enumerate(self.lens)]


def _own_window(j: int) -> list[int]:
    """CASA's window rule: window j sees its own images."""
    return [j]


@dataclass
class _OpenWindow:
    """What a fused layer's cache knows of a sample's open window, beyond its keys.

    number: the window's place in its sample (0, 1, ...: `WindowedFusion.visible_windows`);
    seen: {window number: its image (k, v) [n, Hkv, D]} the images of the windows it sees that
    the next window will still see (nothing under CASA's own-window rule, so no image key is
    held twice); keyless: eq. 3's indicator gave it no key."""

    number: int
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]]
    keyless: bool = False

    @staticmethod
    def open(prev: "_OpenWindow | None", own: tuple[torch.Tensor, torch.Tensor],
             rule) -> "tuple[_OpenWindow, tuple[torch.Tensor, torch.Tensor]]":
        """The sample's next window (its first if prev is None), opened by the images `own`
        [n, Hkv, D] -> (its state, the image (k, v) it sees, in key order)."""
        j = 0 if prev is None else prev.number + 1
        available = {**(prev.seen if prev is not None else {}), j: own}
        wanted = list(rule(j))
        missing = [v for v in wanted if v not in available]
        if missing:
            raise ValueError(f"the window rule's window {j} sees windows {wanted}, but the cache no longer holds "
                             f"the images of {missing}: a window may see only windows the one before it saw, "
                             "plus itself (casa.fusion.windows.WindowedFusion.visible_windows)")
        parts = [available[v] for v in wanted]
        images = parts[0] if len(parts) == 1 else (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        if not parts:
            images = own[0][:0], own[1][:0]
        later = set(rule(j + 1))
        return _OpenWindow(j, {v: available[v] for v in wanted if v in later}), images


class KVCache:
    def __init__(self, num_samples: int):
        self.num_samples = num_samples
        self.sa: dict[int, list[tuple[torch.Tensor, torch.Tensor] | None]] = {}
        self.win: dict[int, list[tuple[torch.Tensor, torch.Tensor] | None]] = {}
        self.offset = torch.zeros(num_samples, dtype=torch.long)
        # SA and CASA window entries are views of growing buffers: appending a token copies
        # that token only (a torch.cat of the whole past per token made streaming O(L^2) in
        # memcpy); one sample's storage is head-major with keys transposed, see `_append`
        self._sa_buf: dict[int, list[tuple[torch.Tensor, torch.Tensor] | None]] = {}
        self._win_buf: dict[int, list[tuple[torch.Tensor, torch.Tensor] | None]] = {}
        self._win_open: dict[int, list[_OpenWindow | None]] = {}  # the open windows' rule state (`window`)
        self._workspace: torch.Tensor | None = None
        self._flash_sa: dict[int, _FlashRows] = {}  # SA layers under flash with several samples
        self._seqlens: tuple[tuple[int, ...], torch.Tensor] | None = None  # one per step, shared by the layers
        # boundaries read back to the host once per chunk: every layer passes the same tensors
        # (the stream's cu_seqlens, the window index), so a read per layer is a sync per layer
        self._host_reads: list[tuple[torch.Tensor, list[int]]] = []

    # ------------------------------------------------------------------ bookkeeping
    def keep(self, indices: list[int]) -> None:
        """Keep only these samples (in this order), e.g. drop the ones that finished."""
        for store in (self.sa, self.win, self._sa_buf, self._win_buf, self._win_open):
            for layer, per_sample in store.items():
                store[layer] = [per_sample[i] for i in indices]
        if indices != list(range(self.num_samples)):  # generation calls this every step
            for layer, rows in self._flash_sa.items():
                # compact once per finished sample (not per token): the kernel's rows stay 0..S'-1
                idx = torch.tensor(indices, dtype=torch.long, device=rows.k.device)
                rows.k, rows.v = rows.k.index_select(0, idx), rows.v.index_select(0, idx)
                rows.lens = [rows.lens[i] for i in indices]
                self.sa[layer] = rows.views()
        self.offset = self.offset[indices]
        self.num_samples = len(indices)

    @property
    def head_major(self) -> bool:
        """Layout of the buffers allocated from now on (`_append`): head-major for one sample."""
        return self.num_samples == 1

    def _head_major(self, backend) -> bool:
        """Head-major buffers serve the backends that read strided keys in place (`sdpa`'s
        decoding path, `eager`); for flash, flex and dense one sample's token-major buffer is
        itself the contiguous key tensor they take (`casa.attention`: no copy, no concatenation)."""
        return self.head_major and _name(backend) in ("sdpa", "eager")

    def text_kv_tokens(self) -> int:
        """Tokens held by the first SA layer's cache, summed over samples (the 'text KV
        cache' of the paper; image tokens appear here only for insertion strategies)."""
        if not self.sa:
            return 0
        first = self.sa[min(self.sa)]
        return sum(int(e[0].shape[0]) for e in first if e is not None)

    def lengths(self) -> list[int]:
        """Tokens in each sample's SA cache (first SA layer)."""
        if not self.sa:
            return [0] * self.num_samples
        return [0 if e is None else int(e[0].shape[0]) for e in self.sa[min(self.sa)]]

    @torch.no_grad()
    def trim(self, keep_first: int, keep_last: int, rotate) -> int:
        """Drop each sample's SA tokens keep_first .. n - keep_last - 1 and move the kept tail,
        the open window's keys and the next position back by the number dropped (module doc,
        "Context limit") -> the most tokens dropped from a sample.

        rotate(k [n, Hkv, D], d) -> k rotated d positions back. Needs positions equal to cache
        rows (every strategy with 1-D RoPE, and CA/CASA's text-only SA cache under M-RoPE);
        insertion under M-RoPE, whose image tokens take fewer positions than rows, is refused."""
        lengths = self.lengths()
        drop = [max(0, n - keep_first - keep_last) for n in lengths]
        if not any(drop):
            return 0
        if self._flash_sa:
            raise ValueError("KVCache.trim: the several-sample flash cache (_FlashRows) is not trimmable; "
                             "live captioning runs one sample")
        if self.offset.tolist() != lengths:
            raise ValueError(f"KVCache.trim: positions {self.offset.tolist()} are not the cache lengths {lengths} "
                             "(M-RoPE insertion: image tokens share positions), so a tail cannot be re-encoded")

        def rebuilt(bufs, s, k, v):  # a fresh buffer in the old one's layout (`_append`)
            head_major = bufs[s] is not None and bufs[s][0].stride(0) == 1 and k.shape[-1] > 1
            bufs[s] = None
            return self._append(bufs, s, None, k, v, head_major, extra=64)

        for layer, store in self.sa.items():
            bufs = self._sa_buf.setdefault(layer, [None] * self.num_samples)
            for s, e in enumerate(store):
                if e is None or not drop[s]:
                    continue
                k, v, n = e[0], e[1], e[0].shape[0]
                k = torch.cat([k[:keep_first], rotate(k[n - keep_last:], drop[s])])
                v = torch.cat([v[:keep_first], v[n - keep_last:]])
                store[s] = rebuilt(bufs, s, k, v)
        for layer, store in self.win.items():
            bufs = self._win_buf.setdefault(layer, [None] * self.num_samples)
            for s, e in enumerate(store):
                if e is None or not drop[s]:
                    continue
                k = rotate(e[0], drop[s])  # [image keys | text keys] of the open window, or CA's images
                store[s] = rebuilt(bufs, s, k, e[1]) if bufs[s] is not None else (k, e[1])
                opened = self._win_open.get(layer, [None] * self.num_samples)[s]
                if opened is not None:
                    opened.seen = {w: (rotate(kv[0], drop[s]), kv[1]) for w, kv in opened.seen.items()}
        self.offset = self.offset - torch.tensor(drop, dtype=torch.long)
        return max(drop)

    def window_kv_tokens(self) -> int:
        """Tokens held by the fused layers' window caches (first fused layer)."""
        if not self.win:
            return 0
        first = self.win[min(self.win)]
        return sum(int(e[0].shape[0]) for e in first if e is not None)

    def nbytes(self) -> int:
        total = 0
        for store in (self.sa, self.win):
            for per_sample in store.values():
                for e in per_sample:
                    if e is not None:
                        total += e[0].numel() * e[0].element_size() * 2
        return total

    def workspace(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        """A scratch buffer of `numel` elements of like's dtype and device, reused by every layer's decoding
        attention (`casa.attention.varlen_attention(workspace=...)`): the scores of a step
        over a growing cache are its only O(length) temporary, and fresh memory for them at
        every call costs page faults whenever the allocator hands large blocks back to the OS.
        Grows by 25% when too small; layers run one after another, so one buffer serves all."""
        buf = self._workspace
        if buf is None or buf.dtype != like.dtype or buf.device != like.device or buf.numel() < numel:
            buf = self._workspace = like.new_empty((5 * numel) // 4 + 1)
        return buf[:numel]

    # ------------------------------------------------------------------ layer hooks
    def self_attention(self, layer: int, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, backend: str = "sdpa"):
        """k, v [L, Hkv, D] of the chunk, cu [S+1] -> keys/values of past + chunk per sample
        (segmented: one [n_s, Hkv, D] view of each sample's buffer, `casa.attention`; both
        wrapped in one `DecodeKV` when the buffers are head-major, attention's decoding path)
        and their boundaries cu_k [S+1]. backend: the attention backend (or its name) that
        reads them (layout)."""
        store = self.sa.setdefault(layer, [None] * self.num_samples)
        if _name(backend) == "flash" and not torch.is_grad_enabled() and (
                layer in self._flash_sa or (self.num_samples > 1 and all(e is None for e in store))):
            return self._flash_self_attention(layer, k, v, cu)
        bufs = self._sa_buf.setdefault(layer, [None] * self.num_samples)
        bounds = self._host(cu)
        lens = [0]
        for s in range(len(bounds) - 1):
            k_new, v_new = k[bounds[s]:bounds[s + 1]], v[bounds[s]:bounds[s + 1]]
            if torch.is_grad_enabled():  # in-place buffer writes would break autograd
                if store[s] is not None:
                    k_new, v_new = torch.cat([store[s][0], k_new]), torch.cat([store[s][1], v_new])
                store[s], bufs[s] = (k_new, v_new), None
            else:
                store[s] = self._append(bufs, s, store[s], k_new, v_new, self._head_major(backend))
            lens.append(lens[-1] + store[s][0].shape[0])
        cu_k = torch.tensor(lens, dtype=torch.int32, device=k.device)
        ks, vs = [e[0] for e in store], [e[1] for e in store]
        if not torch.is_grad_enabled() and self._head_major(backend):
            kv = DecodeKV(ks, vs)  # head-major buffers: attention's explicit decoding path
            return kv, kv, cu_k
        return ks, vs, cu_k

    def _flash_self_attention(self, layer: int, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor):
        """`self_attention` for flash with several samples (`_FlashRows`). A step where every
        sample has m new tokens -> (CachedKV, CachedKV, None): the kernel appends k, v to the
        layer's buffer itself. Otherwise (a prefill chunk, unequal counts: once per prompt) the
        chunk is written here and the keys go back segmented, as `self_attention`'s."""
        bounds = self._host(cu)
        S, (Hkv, D) = len(bounds) - 1, k.shape[1:]
        new = [bounds[s + 1] - bounds[s] for s in range(S)]
        rows = self._flash_sa.get(layer)
        if rows is None:
            # flash's dtype (as `casa.attention._flash` casts fp32 under autocast): a step casts
            # its new keys only, never the cache
            dtype = flash_dtype(k.dtype, k.device.type)
            rows = self._flash_sa[layer] = _FlashRows(k.new_empty(S, 0, Hkv, D, dtype=dtype),
                                                      v.new_empty(S, 0, Hkv, D, dtype=dtype), [0] * S)
        past = rows.lens
        rows.grow(max(n + m for n, m in zip(past, new)) + (256 if rows.k.shape[1] == 0 else 0))
        rows.lens = [n + m for n, m in zip(past, new)]
        self.sa[layer] = rows.views()
        if len(set(new)) == 1 and new[0] > 0:
            if self._seqlens is None or self._seqlens[0] != tuple(past) or self._seqlens[1].device != k.device:
                self._seqlens = (tuple(past), torch.tensor(past, dtype=torch.int32, device=k.device))
            m = new[0]
            kv = CachedKV(rows.k, rows.v, self._seqlens[1], k.to(rows.k.dtype).reshape(S, m, Hkv, D).contiguous(),
                          v.to(rows.v.dtype).reshape(S, m, Hkv, D).contiguous())
            return kv, kv, None
        for s in range(S):
            rows.k[s, past[s]:rows.lens[s]] = k[bounds[s]:bounds[s + 1]]
            rows.v[s, past[s]:rows.lens[s]] = v[bounds[s]:bounds[s + 1]]
        lens = [0]
        for n in rows.lens:
            lens.append(lens[-1] + n)
        keys = self.sa[layer]
        return [e[0] for e in keys], [e[1] for e in keys], torch.tensor(lens, dtype=torch.int32, device=k.device)

    @staticmethod
    def _append(bufs: list, s: int, past: tuple[torch.Tensor, torch.Tensor] | None, k_new: torch.Tensor,
                v_new: torch.Tensor, head_major: bool, extra: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v_new [m, Hkv, D] after the n rows of `past` (views of bufs[s], or None: a
        fresh buffer) -> views [n + m, Hkv, D]. A fresh buffer has `extra` spare rows; a full
        one grows by 25% (at least `extra` rows): amortised O(m) per append, at most a quarter
        of the cache unused.

        Attention gets each sample's views as they are (segmented keys), so nothing
        concatenates them. With `head_major` (`KVCache.head_major`: one sample, live
        captioning and chat) storage is head-major with keys transposed, k [Hkv, D, cap] and
        v [Hkv, cap, D], held as [cap, Hkv, D] views: a decoding step's q @ k^T and p @ v
        (`casa.attention._decode_segment`) then read each head's keys and values as one
        contiguous block, in the layout the matmul wants, with no copy (token-major keys made
        q @ k^T 1.6-3x slower at 3.3k keys: docs/benchmarks.md, `stream`). Otherwise it is
        token-major [cap, Hkv, D] and decoding runs SDPA's kernel, ~5% faster for the `layer`
        suite's 10 samples at D = 128 (and no transposing copy of each window's image keys)."""
        n, m = (0 if past is None else past[0].shape[0]), k_new.shape[0]
        buf = None if past is None else bufs[s]
        if buf is None or buf[0].shape[0] < n + m or past[0].data_ptr() != buf[0].data_ptr():
            cap = n + m + extra if past is None else max(n + m + extra, (5 * (n + m)) // 4)
            Hkv, D = k_new.shape[1:]
            if head_major:
                k_buf = k_new.new_empty(Hkv, D, cap).permute(2, 0, 1)  # [Hkv, D, cap] -> view [cap, Hkv, D]
                v_buf = v_new.new_empty(Hkv, cap, D).transpose(0, 1)  # [Hkv, cap, D] -> view [cap, Hkv, D]
            else:
                k_buf, v_buf = k_new.new_empty(cap, Hkv, D), v_new.new_empty(cap, Hkv, D)
            buf = (k_buf, v_buf)
            if past is not None:
                buf[0][:n], buf[1][:n] = past
            bufs[s] = buf
        buf[0][n:n + m], buf[1][n:n + m] = k_new, v_new
        return buf[0][:n + m], buf[1][:n + m]

    def window(self, layer: int, kind: str, k_img: torch.Tensor, v_img: torch.Tensor, k_txt: torch.Tensor,
               v_txt: torch.Tensor, index: WindowIndex, backend: str = "sdpa"):
        """Keys/values for the chunk's windows -> (k, v, cu_k [W+1]), segmented (one
        [Lk_w, Hkv, D] per window, `casa.attention`; a `DecodeKV` for head-major CASA windows).

        k_img, v_img [N, Hkv, D]: the chunk's images, window w's own at rows
        `index.own_cu_image` (or `window_cu_image`) w:w+1. A chunk window that has no image
        continues the sample's cached window (a chunk of new text tokens); one with images
        opens the sample's next window, which sees the images the strategy's window rule says
        (`index.visible_windows`, CASA's: its own), drawn from the new images and those the
        cache kept. CASA windows live in buffers like the SA cache's ([images | text] rows,
        `_append`): a decoded token writes its own key, not a copy of the window; CA windows
        are the image keys. With eq. 3's indicator (`index.indicator`) a CASA window that
        sees no image has no key: its text gets no update, as in the full forward."""
        cu_t = self._host(index.cu_q)
        cu_i = self._host(index.own_cu_image if index.own_cu_image is not None else index.window_cu_image)
        rule = index.visible_windows or _own_window
        store = self.win.setdefault(layer, [None] * self.num_samples)
        bufs = self._win_buf.setdefault(layer, [None] * self.num_samples)
        opened = self._win_open.setdefault(layer, [None] * self.num_samples)
        # which window continues a sample's open window and which opens one: the window
        # rule's (`casa.batch.continues_open_window`), on the chunk's boundaries
        owner, _ = window_samples(self._sample_cu, cu_t)
        continued = continues_open_window(self._sample_cu, cu_t, cu_i)
        ks, vs, lens = [], [], [0]
        grad = torch.is_grad_enabled()
        head_major = self._head_major(backend)
        for w in range(len(cu_t) - 1):
            txt_k, txt_v = k_txt[cu_t[w]:cu_t[w + 1]], v_txt[cu_t[w]:cu_t[w + 1]]
            s = owner[w]
            if continued[w] and store[s] is not None:
                if kind != "casa" or opened[s].keyless:
                    keys = store[s]
                elif grad:  # in-place buffer writes would break autograd
                    keys = torch.cat([store[s][0], txt_k]), torch.cat([store[s][1], txt_v])
                else:
                    keys = self._append(bufs, s, store[s], txt_k, txt_v, head_major, extra=64)
            else:
                own = k_img[cu_i[w]:cu_i[w + 1]], v_img[cu_i[w]:cu_i[w + 1]]
                opened[s], (img_k, img_v) = _OpenWindow.open(opened[s] if store[s] is not None else None, own, rule)
                opened[s].keyless = kind == "casa" and index.indicator and img_k.shape[0] == 0
                if kind != "casa":
                    keys = img_k, img_v
                elif opened[s].keyless:  # eq. 3: no image seen, no key
                    keys = txt_k[:0], txt_v[:0]
                elif grad:
                    keys = torch.cat([img_k, txt_k]), torch.cat([img_v, txt_v])
                else:
                    # a fresh buffer: this chunk may still read the old window (its continuation)
                    keys = self._append(bufs, s, None, img_k, img_v, head_major, extra=txt_k.shape[0] + 64)
                    keys = self._append(bufs, s, keys, txt_k, txt_v, head_major, extra=64)
            ks.append(keys[0])
            vs.append(keys[1])
            lens.append(lens[-1] + keys[0].shape[0])
            store[s] = keys  # a sample's last window of the chunk is the one that stays open
        cu_k = torch.tensor(lens, dtype=torch.int32, device=k_txt.device)
        if kind == "casa" and not grad and head_major:
            kv = DecodeKV(ks, vs)  # head-major buffers (`_append`): attention's explicit decoding path
            return kv, kv, cu_k
        return ks, vs, cu_k

    def begin(self, sample_cu: torch.Tensor) -> None:
        """Called by the model before a chunk's forward: the chunk's sample boundaries."""
        if sample_cu.numel() - 1 != self.num_samples:
            raise ValueError(f"chunk has {sample_cu.numel() - 1} samples, the cache holds {self.num_samples}")
        self._sample_cu = sample_cu.tolist()
        self._host_reads = []

    def _host(self, t: torch.Tensor) -> list[int]:
        """t.tolist(), read once per chunk for each boundary tensor the layers share."""
        for held, values in self._host_reads:
            if held is t:
                return values
        values = t.tolist()
        self._host_reads.append((t, values))  # held, so its id cannot be reused within the chunk
        return values

    def advance(self, last_positions: torch.Tensor) -> None:
        """[S] position of each sample's last chunk token -> next offsets."""
        self.offset = last_positions.long().cpu() + 1
