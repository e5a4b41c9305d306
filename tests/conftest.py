"""Shared test setup: everything must work offline (no HF hub), so make any hub access fail loudly."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
