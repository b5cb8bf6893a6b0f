"""LoRA adapters: the adapter tree's math (lora.py: rank masks, frozen A, merging) and PEFT's file
format (peft_io.py: reading and writing adapter folders that transformers/PEFT load)."""
