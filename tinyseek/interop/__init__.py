"""Model formats in and out: other tools' checkpoints <-> tinyseek's :class:`~tinyseek.model.Transformer`.

- ``hf_import.py``  a Hugging Face directory (config.json + safetensors) -> our model, logits exact
- ``hf_export.py``  our model -> a Hugging Face directory of an existing transformers architecture
- ``gguf_io.py``    llama.cpp GGUF files in (dequantized, tokenizer rebuilt) and out (f32, f16, q8_0)

Layering: uses ``model`` (and the ``tokenizers`` / ``gguf`` packages), never ``train`` or above;
the ``import`` and ``export`` stages (:mod:`tinyseek.importer`, :mod:`tinyseek.export`) wire it in.
"""
