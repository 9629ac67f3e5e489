"""Bridges from attnzoo to other libraries. Each submodule imports its library lazily, so ``import attnzoo`` never
needs them: ``attnzoo.integrations.transformers`` (the ``hf`` extra) serves attnzoo methods as Hugging Face
transformers attention implementations."""
