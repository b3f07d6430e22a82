"""Attention-map capture: what text tokens look at inside CASA / CA layers.

Every `every_n_steps` optimizer steps (and at the end of fit) the callback runs one fixed
validation batch through the model inside `capture_attention` (the eager backend, for
that batch only) and writes, under `<run_dir>/attention/step_XXXXXX/`:

    fig7.png / fig7.json     the paper's Fig. 7 view (log scale): attention to self, to one
                             other text token, to image tokens in groups of 16, to the
                             vision start/end tokens, averaged over heads, layers and queries
    layer_XX.png             per fused layer: one window's queries x [image keys | text keys]
    and logs attention/layer_XX/{self,text,image}: the attention mass on self, other text
                             and image per layer (the implicit-gating diagnostic) as curves.

Nothing runs on other steps. Only rank zero captures and writes.

Several ranks: under FSDP2 every block forward is a collective, so every rank runs the capture
forward; only rank zero needs a validation batch with images (`plan_capture`). The others
join with any batch of theirs (a text-only one runs the model's idle sample, which keeps the
collectives matched: `VisionLanguageModel.needs_idle_sample`). When rank zero has no image
batch but another rank has, that rank's batch is sent to rank zero once; when no rank has one,
rank zero says so once and nothing is captured.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from callbacks.attention_stats import fig7, head_stats, layer_masses


def plan_capture(has_image: list[bool], has_batch: list[bool]) -> tuple[int | None, str | None]:
    """Who provides rank zero's capture batch, from every rank's (has a validation batch with
    images, has any batch to join the forward with) -> (source rank, None), or (None, why not).

    Rank zero captures from the lowest rank with an image batch (itself when it has one); every
    other rank must have some batch to run the forward with (the collectives must match)."""
    if not any(has_image):
        return None, ("no rank has a validation batch with images (text-only validation data?): no attention "
                      "map is written")
    src = has_image.index(True)
    idle = [r for r in range(1, len(has_batch)) if not (has_batch[r] or has_image[r])]
    if idle:
        return None, (f"rank(s) {idle} have no validation batch to run the capture forward with (every rank must "
                      "join it): no attention map is written")
    return src, None


class AttentionMaps(L.Callback):
    """Args:
        every_n_steps: capture interval in optimizer steps (once per step whatever
            accumulate_grad_batches is).
        layers: fused layer indices to keep (None: all).
        heads: heads averaged in the heatmaps (None: all).
        num_windows: windows drawn per layer heatmap (the first ones that have image keys).
        max_samples: samples of the fixed validation batch used.
        out_dir: where to write (default: <trainer.default_root_dir>/attention).
        at_start: also capture before the first step (step 0: the baseline of every map).
    """

    def __init__(self, every_n_steps: int = 200, layers: list[int] | None = None, heads: list[int] | None = None,
                 num_windows: int = 1, max_samples: int = 8, out_dir: str | None = None, at_start: bool = False):
        if every_n_steps < 1:
            raise ValueError(f"AttentionMaps.every_n_steps={every_n_steps} must be >= 1")
        self.every_n_steps, self.layers, self.heads = every_n_steps, layers, heads
        self.num_windows, self.max_samples, self.out_dir = num_windows, max_samples, out_dir
        self.at_start = at_start
        self._batch = None  # this rank's first validation batch with images
        self._join = None  # this rank's first validation batch (what a rank other than zero runs)
        self._scanned = False
        self._warned = False
        self.captures = 0
        self._step = 0  # the global step of the last optimizer step seen

    # ------------------------------------------------------------------ batch
    def _fixed_batch(self, trainer: L.Trainer):
        """This rank's first validation batch with images (None if it has none); its first
        batch of any kind is kept in `_join`. Read once: the result is cached, absence too."""
        if not self._scanned:
            self._scanned = True
            dm = trainer.datamodule
            loaders = dm.val_dataloader() if dm is not None else []
            loaders = loaders if isinstance(loaders, list) else [loaders]
            for dl in loaders:
                for b in dl:
                    self._join = b if self._join is None else self._join
                    if b.num_images:
                        self._batch = b
                        break
                if self._batch is not None:
                    break
        return self._batch

    def _capture_batch(self, trainer: L.Trainer):
        """The batch this rank runs the capture forward with (rank zero: one with images), the
        same decision on every rank; None (on every rank) when there is no capture."""
        own = self._fixed_batch(trainer)
        dist = torch.distributed
        if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            src, why = plan_capture([own is not None], [self._join is not None])
        else:
            flags: list = [None] * dist.get_world_size()
            dist.all_gather_object(flags, (own is not None, self._join is not None))
            src, why = plan_capture([f[0] for f in flags], [f[1] for f in flags])
            if src not in (None, 0):  # rank zero has no image batch: rank src's, sent once (then cached)
                box = [own if trainer.global_rank == src else None]
                dist.broadcast_object_list(box, src=src)
                if trainer.is_global_zero:
                    self._batch = own = box[0]
        if why is not None:
            if not self._warned:
                rank_zero_warn(f"AttentionMaps: {why}")
                self._warned = True
            return None
        return own if trainer.is_global_zero or own is not None else self._join

    def _dir(self, trainer: L.Trainer) -> Path:
        return Path(self.out_dir or Path(trainer.default_root_dir) / "attention")

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer, pl_module) -> None:
        self._step = trainer.global_step  # a resumed run starts from its checkpoint's step
        if self.at_start and trainer.global_step == 0:
            self.capture(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # once per optimizer step: micro-batches of an accumulation window leave global_step
        # as it was, and only the last one of the window advances it
        if trainer.global_step == self._step:
            return
        self._step = trainer.global_step
        if trainer.global_step % self.every_n_steps == 0:
            self.capture(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.capture(trainer, pl_module)

    def capture(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict | None:
        model = getattr(pl_module, "model", pl_module)
        if not hasattr(model, "capture_attention"):
            return None
        # Every rank runs the capture forward: under FSDP2 each block's forward all-gathers its
        # parameters, so a forward on rank zero alone would wait forever for the others. The
        # ranks agree first on whether there is a capture (see the module doc).
        batch = self._capture_batch(trainer)
        if batch is None:
            return None
        batch = batch.to(pl_module.device)
        was_training = model.training
        model.eval()
        try:
            # in the trainer's precision (bf16 autocast under bf16-mixed), as training runs:
            # a flash backbone refuses the fp32 it would get outside it
            with torch.no_grad(), trainer.precision_plugin.forward_context(), model.capture_attention() as records:
                model(batch)
        finally:
            model.train(was_training)
        # a batch with images gives one record per fused layer call (a text-only batch on a rank
        # other than zero runs the idle sample's image); none from a layer means the records were
        # lost on the way (e.g. a capture list copied by FSDP2's input cast): every rank raises
        fusion = getattr(model, "fusion", None)
        missing = sorted(set(fusion.fused_layers() if fusion is not None else ()) - {r["layer"] for r in records})
        if missing:
            raise RuntimeError(f"AttentionMaps: the capture forward at step {trainer.global_step} recorded nothing for "
                               f"fused layers {missing} of {type(fusion).__name__} (got {len(records)} records): the "
                               "attention records did not reach VisionLanguageModel.capture_attention")
        if not trainer.is_global_zero:  # rank zero writes each file once
            return None
        if self.layers is not None:
            records = [r for r in records if r["layer"] in self.layers]
        if self.heads is not None:
            records = [{**r, "probs": [p[self.heads] for p in r["probs"]]} for r in records]
        if not records:
            return None
        self.captures += 1
        out = self._dir(trainer) / f"step_{trainer.global_step:06d}"
        out.mkdir(parents=True, exist_ok=True)
        tok = getattr(trainer.datamodule, "tokenizer", None)
        specials = {}
        if tok is not None:
            for name in ("<|vision_start|>", "<|vision_end|>"):
                tid = tok.convert_tokens_to_ids(name)
                if tid is not None and tid != tok.unk_token_id:
                    specials[name.strip("<|>")] = tid
        summary = fig7(records, special_ids=specials, input_ids=batch.input_ids.cpu())
        masses = layer_masses(records)
        (out / "fig7.json").write_text(json.dumps({"fig7": summary, "layers": masses, "heads": head_stats(records)}, indent=1))
        self._plot_fig7(summary, out / "fig7.png", trainer.global_step)
        for layer in sorted({r["layer"] for r in records}):
            rec = next(r for r in records if r["layer"] == layer)
            self._plot_layer(rec, out / f"layer_{layer:02d}.png")
        # straight to the loggers: this also runs in on_fit_end, where self.log is not allowed
        scalars = {f"attention/layer_{layer:02d}/{k}": v for layer, m in masses.items() for k, v in m.items()}
        for lg in trainer.loggers:
            lg.log_metrics(scalars, step=trainer.global_step)
        return summary

    # ------------------------------------------------------------------ plots
    def _plot_fig7(self, s: dict, path: Path, step: int) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels, values = ["self", "text (per key)"], [s["self"], s["text"]]
        for name in ("vision_start", "vision_end"):
            if s.get(name) is not None:
                labels.append(name)
                values.append(s[name])
        labels += [f"img {16 * g}-{16 * g + 15}" for g in range(len(s["image_groups"]))]
        values += s["image_groups"]
        fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(values) + 2), 3.5))
        colors = ["tab:red", "tab:orange"] + ["tab:purple"] * (len(labels) - 2 - len(s["image_groups"])) + \
            ["tab:blue"] * len(s["image_groups"])
        ax.bar(range(len(values)), [max(v, 1e-12) for v in values], color=colors)
        ax.set_yscale("log")
        ax.set_xticks(range(len(values)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("mean attention per key")
        ax.set_title(f"CASA attention (step {step}, {s['queries']} queries)")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def _plot_layer(self, rec: dict, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cu_i = rec["window_cu_image"]
        wins = [w for w, p in enumerate(rec["probs"]) if p.shape[1] and cu_i[w + 1] > cu_i[w]][: self.num_windows]
        if not wins:
            return
        fig, axes = plt.subplots(1, len(wins), figsize=(4.5 * len(wins), 3.5), squeeze=False)
        for ax, w in zip(axes[0], wins):
            p = rec["probs"][w].float().mean(0)  # [Lq, Lk] averaged over heads
            n_img = cu_i[w + 1] - cu_i[w]
            im = ax.imshow(p.clamp(min=1e-6).log10().numpy(), aspect="auto", cmap="viridis")
            ax.axvline(n_img - 0.5, color="white", lw=1)
            ax.set_xlabel(f"keys: {n_img} image | {p.shape[1] - n_img} text")
            ax.set_ylabel("text queries")
            ax.set_title(f"layer {rec['layer']} ({rec['kind']}), window {w}", fontsize=9)
            fig.colorbar(im, ax=ax, label="log10 p")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
