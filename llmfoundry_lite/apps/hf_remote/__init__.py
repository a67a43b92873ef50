"""Modeling code written into exported Hugging Face folders (``auto_map``); imports only torch and transformers."""
