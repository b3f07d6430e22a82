"""The Hugging Face format of a trained model: `python -m experiments.export --ckpt CKPT --out DIR`.

    DIR/config.json               CasaConfig (model_type "casa"): the full `model.model` spec
                                  (fusion strategy and every architecture setting), the chat
                                  template's name, the run's inference settings and precision
    DIR/model.safetensors         the weights (the Lightning checkpoint's "model." entries)
    DIR/tokenizer.json, ...       the run's tokenizer, its chat template as Jinja
                                  (`ChatTemplate.jinja`: `apply_chat_template` renders our encoding)
    DIR/preprocessor_config.json  Qwen2VLImageProcessor with the run's pixel limits
    DIR/configuration_casa.py, DIR/modeling_casa.py   remote code (`auto_map`), so that
        AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) loads it

The remote code is a thin `PreTrainedModel` around `casa.model.VisionLanguageModel`: its
modeling file imports `casa` (the model is not copied into DIR), so casa must be importable
(installed, or on PYTHONPATH) where DIR is loaded. `casa.assistant.load(DIR)` loads it too.
"""
