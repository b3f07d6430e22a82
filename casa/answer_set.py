"""Teacher-forced scoring of closed-answer questions: the log-likelihood of every candidate
of a task's answer set given the prompt, as lmms-eval scores multiple choice
(`loglikelihood` requests: the sum of the answer tokens' log-probabilities, the template's
end-of-turn token included, so "1" is never scored as a prefix of "12"). The argmax over
the candidates is the prediction; its accuracy has no parsing, no generation length and a
chance level of 1 / |answer set| for a uniform guesser.

Cost: the prompts' images go through the vision tower and projector ONCE
(`VisionLanguageModel.encode_images`); every (sample, candidate) pair is then one packed
sample [prompt | candidate | end] whose image tokens are gathered from those embeddings
(`hidden_states(image_embeds=...)`). Samples never see each other in a packed row
(block-diagonal attention), so the S x K pairs of a batch are one forward.

    eval batch (S samples, labels, meta prompt_len)
      -> prompts (truncate_samples)                          S samples, I images
      -> image_embeds = encode_images(prompts)               [N, d]
      -> rows: for s, for k: prompt_s + cand_{s,k} + end     S*K samples, I*K image slots
      -> logits at the candidate positions only              [sum of candidate lengths, V]
      -> per (s, k): sum of log p(candidate token)           [S][K]
"""

from __future__ import annotations

import torch

from casa.batch import PackedBatch, build_batch, image_token_count
from casa.generation import truncate_samples


def candidate_rows(prompts: PackedBatch, candidates: list[list[list[int]]], merge: int
                   ) -> tuple[PackedBatch, torch.Tensor]:
    """prompts (S samples) + per sample its K_s candidate token lists (each ending with the
    end-of-turn token) -> (a batch of sum(K_s) samples [prompt | candidate], labels on the
    candidate tokens (pre-shifted: labels[p] = input_ids[p + 1]); image_index [N'] the rows
    of the prompts' image embeddings each image token of the new batch takes).

    Position ids continue the prompt's (1-D or M-RoPE [3, T]): the candidate tokens sit where
    generation would put them. pixel_values are left empty: the caller passes the embeddings."""
    S = prompts.num_samples
    if len(candidates) != S:
        raise ValueError(f"candidate_rows: {len(candidates)} candidate lists for {S} prompts")
    cu = prompts.sample_cu_seqlens.tolist()
    img_pos = prompts.image_text_position.tolist()
    counts = image_token_count(prompts.image_grid_thw.tolist(), merge)
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    dev = prompts.input_ids.device
    pos = prompts.position_ids  # [T] or [3, T]
    ids, labels, positions, new_cu = [], [], [], [0]
    grids, new_img_pos, image_index = [], [], []
    for s, cands in enumerate(candidates):
        lo, hi = cu[s], cu[s + 1]
        images = [i for i, p in enumerate(img_pos) if lo <= p < hi]
        for cand in cands:
            if not cand:
                raise ValueError(f"candidate_rows: sample {s} has an empty candidate (it must end with the end token)")
            base = new_cu[-1]
            c = torch.tensor(cand, dtype=torch.long, device=dev)
            ids += [prompts.input_ids[lo:hi], c]
            n = hi - lo
            # the last prompt token predicts the first candidate token; the last candidate token predicts nothing
            lab = torch.full((n + len(cand),), -100, dtype=torch.long, device=dev)
            lab[n - 1:n - 1 + len(cand)] = c
            labels.append(lab)
            last = pos[..., hi - 1:hi]  # [1] or [3, 1]
            step = torch.arange(1, len(cand) + 1, device=dev)
            positions += [pos[..., lo:hi], last + step]  # [.., n], [.., L]
            new_cu.append(base + n + len(cand))
            for i in images:
                grids.append(prompts.image_grid_thw[i].tolist())
                new_img_pos.append(base + img_pos[i] - lo)
                image_index.append(torch.arange(starts[i], starts[i + 1], device=dev))
    empty_pixels = prompts.pixel_values.new_zeros(0, prompts.pixel_values.shape[-1])
    batch = build_batch(torch.cat(ids), new_cu, pixel_values=empty_pixels,
                        image_grid_thw=grids or torch.zeros(0, 3, dtype=torch.long), image_text_position=new_img_pos,
                        merge=merge, labels=torch.cat(labels), position_ids=torch.cat(positions, dim=-1))
    index = torch.cat(image_index) if image_index else torch.zeros(0, dtype=torch.long, device=dev)
    return batch, index


@torch.no_grad()
def candidate_logprobs(model, batch: PackedBatch, candidates: list[list[list[int]]]) -> list[list[float]]:
    """An evaluation batch (meta[s]["prompt_len"]) and per sample its candidates' token ids
    (end token included) -> per sample, the log-likelihood of each candidate as its answer.

    model: a `casa.model.VisionLanguageModel` (single process: under FSDP2 the root's
    parameters are gathered by its forward, which this bypasses)."""
    merge = model.vision.spatial_merge_size
    prompts = truncate_samples(batch, [m["prompt_len"] for m in batch.meta], merge=merge)
    image_embeds = model.encode_images(prompts)  # [N, d], once per image
    rows, index = candidate_rows(prompts, candidates, merge)
    hidden = model.hidden_states(rows, image_embeds=image_embeds[index])  # [T', d]
    target = rows.labels != -100  # [T']
    logp = model.backbone.head(hidden[target]).float().log_softmax(-1)  # [n, V], candidate positions only
    token_logp = logp.gather(-1, rows.labels[target][:, None])[:, 0]  # [n]
    sample = torch.repeat_interleave(torch.arange(rows.num_samples, device=target.device),
                                     rows.sample_cu_seqlens.diff().long())[target]  # [n]
    sums = torch.zeros(rows.num_samples, dtype=torch.float64, device=target.device)
    sums.index_add_(0, sample, token_logp.double())  # [S*K]
    flat, out, k = sums.tolist(), [], 0
    for cands in candidates:
        out.append(flat[k:k + len(cands)])
        k += len(cands)
    return out


def tokenize_candidates(answers: list[str] | tuple[str, ...], encode, end_ids: list[int]) -> list[list[int]]:
    """Answer strings -> token lists as the template writes an answer: its text tokens
    (`encode(text)`, `ChatTemplate._ids`), then the end-of-turn token(s)."""
    out = [list(encode(a)) + list(end_ids) for a in answers]
    if len({tuple(t) for t in out}) != len(out):
        raise ValueError(f"answers {list(answers)} do not tokenize to distinct candidates")
    return out


def argmax_answers(scores: list[list[float]], answers: list[list[str]]) -> list[str]:
    """Per sample, the candidate of highest log-likelihood (the first of equals)."""
    return [opts[max(range(len(opts)), key=lp.__getitem__)] for lp, opts in zip(scores, answers)]
