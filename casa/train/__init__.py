"""Training: the LightningModule (`module.CasaModule`), the optimiser and schedule
(`optim`) and the validation metrics (`metrics`). The one part of `casa` that imports
Lightning; the model, the processor and inference do not.
"""
