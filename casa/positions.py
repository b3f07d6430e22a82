"""Position ids and stream layouts for image tokens: pure functions of plain tensors.

Two rules, one per family of strategies:

* Insertion (and Q-Former): image tokens are merged into the text stream just before the
  text token they precede. Positions follow the backbone: 1-D RoPE counts every token;
  M-RoPE (Qwen2.5-VL) gives an image of merged grid (t, h, w) the 3-D positions
  (s + t_idx, s + h_idx, s + w_idx) and advances the running position by max(h, w)
  (transformers' `Qwen2_5_VLModel.get_rope_index`).
* Windowed fusion (CA, CASA): text keeps its text-only positions; the image tokens of a
  window get the positions they would have had if inserted just before the window's first
  text token, i.e. they *end* where that token starts (DESIGN.md, "Model assembly").

Both use an image's *extent*: how far it advances the running position (its token count
for 1-D RoPE, max(h, w) of the merged grid for M-RoPE).

Example (1-D RoPE, one sample, text positions 0..4, a 3-token image before text index 2):

    insertion stream   t0 t1 I I I t2 t3 t4     positions 0 1 2 3 4 5 6 7
    windowed           t0 t1 | t2 t3 t4          text positions 0 1 | 2 3 4
                       image keys of window 1 at positions -1 0 1 (end just before t2's 2)
"""

from __future__ import annotations

import torch

from casa.batch import image_token_count


def image_extents(image_grid_thw: torch.Tensor, merge: int, mrope: bool, counts: torch.Tensor | None = None) -> torch.Tensor:
    """[I, 3] -> [I] how far each image advances the running position.

    `counts` overrides the token counts for 1-D RoPE (Q-Former: Q tokens per image)."""
    if mrope and counts is None:
        return torch.maximum(image_grid_thw[:, 1], image_grid_thw[:, 2]).long() // merge
    return counts if counts is not None else image_token_count(image_grid_thw, merge)


def image_rope_positions(starts: torch.Tensor, image_grid_thw: torch.Tensor, merge: int, mrope: bool,
                         counts: torch.Tensor | None = None) -> torch.Tensor:
    """starts [I] -> positions of every image token: [N] (1-D) or [3, N] (M-RoPE).

    With `counts` (Q-Former), each image is a 1-D run of counts[i] tokens (all three M-RoPE
    components equal), since compressed queries have no spatial grid."""
    if counts is not None or not mrope:
        n = counts if counts is not None else image_token_count(image_grid_thw, merge)
        offsets = torch.arange(int(n.sum()), device=starts.device) - torch.repeat_interleave(n.cumsum(0) - n, n)
        pos = torch.repeat_interleave(starts, n) + offsets  # [N]
        return pos.expand(3, -1).clone() if mrope else pos
    parts = []
    for start, (t, h, w) in zip(starts.tolist(), image_grid_thw.tolist()):
        t, h, w = t, h // merge, w // merge  # the merge is spatial only
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        parts.append(torch.stack([tt, hh, ww]).reshape(3, -1) + start)  # [3, t*h*w]
    if not parts:
        return torch.zeros(3, 0, dtype=torch.long, device=starts.device)
    return torch.cat(parts, dim=1).to(starts.device)


def sample_of_text(sample_cu_seqlens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """text indices [K] -> [K] sample each belongs to."""
    return torch.searchsorted(sample_cu_seqlens.long(), index, right=True) - 1


def insertion_layout(sample_cu_seqlens: torch.Tensor, image_text_position: torch.Tensor,
                     counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where text and image tokens go in the merged stream.

    sample_cu_seqlens [S+1], image_text_position [I], counts [I] (tokens per image)
    -> text_dst [T], image_dst [N], merged_cu_seqlens [S+1] int32.
    Image i belongs to the sample of the text token it precedes (PackedBatch invariant).
    """
    T = int(sample_cu_seqlens[-1])
    dev = sample_cu_seqlens.device
    delta = torch.zeros(T + 1, dtype=torch.long, device=dev)
    delta.index_add_(0, image_text_position.long(), counts.long())
    before = delta.cumsum(0) - delta  # [T+1] image tokens strictly before text index p
    inclusive = before + delta  # image tokens placed before text p (images at p come first)
    text_dst = torch.arange(T, device=dev) + inclusive[:T]
    offs = counts.cumsum(0) - counts  # [I] image tokens of earlier images
    starts = image_text_position.long() + offs  # [I] merged index of each image's first token
    N = int(counts.sum())
    within = torch.arange(N, device=dev) - torch.repeat_interleave(offs, counts)
    image_dst = torch.repeat_interleave(starts, counts) + within
    merged_cu = sample_cu_seqlens.long() + before[sample_cu_seqlens.long()]
    merged_cu[-1] = T + N
    return text_dst, image_dst, merged_cu.to(torch.int32)


def insertion_positions(position_ids: torch.Tensor, sample_cu_seqlens: torch.Tensor, image_text_position: torch.Tensor,
                        image_grid_thw: torch.Tensor, merge: int, mrope: bool,
                        counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the merged stream's tokens, split by kind.

    position_ids [T] text-only positions restarting per sample -> (text_pos, image_pos),
    each [T] / [N] for 1-D RoPE or [3, T] / [3, N] for M-RoPE.
    """
    T = position_ids.shape[-1]
    dev = position_ids.device
    pos_1d = position_ids if position_ids.dim() == 1 else position_ids[0]
    ext = image_extents(image_grid_thw, merge, mrope, counts)  # [I]
    delta = torch.zeros(T + 1, dtype=torch.long, device=dev)
    delta.index_add_(0, image_text_position.long(), ext)
    csum = delta.cumsum(0)  # inclusive: extents of images at index <= p
    excl = csum - delta
    starts_s = sample_cu_seqlens.long()[:-1]
    text_sample = sample_of_text(sample_cu_seqlens, torch.arange(T, device=dev))
    text_pos = pos_1d + csum[:T] - excl[starts_s][text_sample]
    # image i starts at its text position + extents of earlier images of its sample
    img_pos_idx = image_text_position.long()
    img_sample = sample_of_text(sample_cu_seqlens, img_pos_idx.clamp(max=max(T - 1, 0)))
    ext_before = ext.cumsum(0) - ext
    first_img_of_sample = torch.searchsorted(img_sample, img_sample)  # images sorted by position
    local_text = torch.where(img_pos_idx < T, pos_1d[img_pos_idx.clamp(max=max(T - 1, 0))], img_pos_idx * 0)
    starts = local_text + ext_before - ext_before[first_img_of_sample]
    image_pos = image_rope_positions(starts, image_grid_thw, merge, mrope, counts)
    if mrope:
        text_pos = text_pos.expand(3, -1).clone()
    return text_pos, image_pos


def window_image_positions(position_ids: torch.Tensor, window_cu_seqlens_text: torch.Tensor,
                           window_cu_seqlens_image: torch.Tensor, image_grid_thw: torch.Tensor, merge: int,
                           mrope: bool, compressed: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of image tokens for windowed fusion: the images of window w end just
    before the window's first text token. -> [N] (1-D) or [3, N] (M-RoPE).

    compressed: [I] tokens per image after compression (Perceiver: a 1-D run of Q tokens per
    image, `image_rope_positions`); the window boundaries stay the uncompressed batch's."""
    pos_1d = position_ids if position_ids.dim() == 1 else position_ids[0]
    counts = image_token_count(image_grid_thw, merge)
    ext = image_extents(image_grid_thw, merge, mrope, compressed)
    img_start_tok = counts.cumsum(0) - counts  # [I] first token of each image in the image stream
    win = torch.searchsorted(window_cu_seqlens_image.long(), img_start_tok, right=True) - 1  # [I]
    first_text = window_cu_seqlens_text.long()[win]
    has_text = first_text < window_cu_seqlens_text.long()[win + 1]
    p0 = torch.where(has_text, pos_1d[first_text.clamp(max=max(pos_1d.numel() - 1, 0))], torch.zeros_like(first_text))
    # extents of the window's images before image i, and in total
    ext_cum = ext.cumsum(0) - ext
    first_img = torch.searchsorted(win, win)
    before_in_win = ext_cum - ext_cum[first_img]
    total = torch.zeros(int(window_cu_seqlens_text.numel()) - 1, dtype=torch.long, device=ext.device)
    total.index_add_(0, win, ext)
    starts = p0 - total[win] + before_in_win
    return image_rope_positions(starts, image_grid_thw, merge, mrope, compressed)
