"""The per-sample processor: one conversation -> model inputs (tokenizer, chat template,
image preprocessing, `Sample` -> `PackedBatch` row). Training (`data/`), evaluation and
inference (`casa.assistant`) all use these modules, so a sample is laid out the same way
in each. Pure torch / transformers / PIL, like the rest of `casa`.
"""
