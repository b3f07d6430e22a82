"""The Hugging Face format of a trained model: `python -m experiments.export --ckpt CKPT --out DIR`.

    DIR/config.json               CasaConfig (model_type "casa"): the full `model.model` spec
                                  (fusion strategy and every architecture setting), the chat
                                  template's name, the run's inference settings and precision,
                                  the image/video placeholder ids, auto_map (AutoConfig,
                                  AutoModel, AutoModelForImageTextToText, AutoModelForCausalLM)
    DIR/generation_config.json    greedy, ending at the template's end-of-turn token
    DIR/model.safetensors         the weights (the Lightning checkpoint's "model." entries)
    DIR/tokenizer.json, ...       the run's tokenizer (+ <|image_pad|>, <|video_pad|> if missing)
    DIR/chat_template.jinja       the run's template (`ChatTemplate.jinja`)
    DIR/preprocessor_config.json  Qwen2VLImageProcessor with the run's pixel limits
    DIR/processor_config.json     CasaProcessor (AutoProcessor): frame sampling of the run
    DIR/README.md                 the model card (`casa.hf.card`)
    DIR/*.py                      remote code: configuration_casa.py, modeling_casa.py,
                                  processing_casa.py and the casa modules they need, copied
                                  flat with their imports made relative (`casa.hf.source`),
                                  and parts.py (the spec's classes)

So DIR runs where transformers runs, without casa:

    model = AutoModelForImageTextToText.from_pretrained(DIR, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(DIR, trust_remote_code=True)
    model.generate(**processor.apply_chat_template(messages, add_generation_prompt=True,
                   tokenize=True, return_dict=True, return_tensors="pt"))

and `casa.assistant.load(DIR)` loads it like a checkpoint.
"""
