"""Strict harness: 8 CPU devices (sharding is tested on CPU), rank promotion errors on.
Fixtures build tiny random Hugging Face checkpoints with a tiny trained tokenizer."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# One persistent XLA compilation cache for the test session, its xdist workers and the CLI subprocesses
# it starts (they inherit the environment): the suite compiles the same tiny programs many times over.
# A cache hit changes no result (the key is the program and its compile options); `_cache_size()`
# checks count traces in memory and are unaffected.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"fedlora_jax_test_xla_{os.getuid()}")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n",
    "Hello, how are you? I am fine, thank you.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 + - * = reverse sort copy",
    "user assistant system",
]


def make_tokenizer(folder=None, vocab_size=400):
    """A small byte-level BPE tokenizer with ChatML special tokens (EOS = <|im_end|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    if folder is not None:
        fast.save_pretrained(str(folder))
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def hf_configs():
    """Tiny random configs of every supported architecture (MHA and GQA for Llama)."""
    import transformers as tf

    common = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    return {
        "llama_mha": tf.LlamaConfig(**common, num_key_value_heads=4),
        "llama_gqa": tf.LlamaConfig(
            **{**common, "num_hidden_layers": 3},
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            },
        ),
        "qwen2": tf.Qwen2Config(**common, num_key_value_heads=2),
        "mistral": tf.MistralConfig(**common, num_key_value_heads=2, head_dim=16, sliding_window=4),
        "gpt2": tf.GPT2Config(
            vocab_size=400, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0
        ),
    }


def save_tiny_hf(name, folder, tokenizer=None, seed=0):
    """Save a tiny random torch model (weights perturbed so biases and norms are non-trivial)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(hf_configs()[name]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return model


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, tiny_tokenizer):
    """name -> (folder, torch model); built lazily and cached for the session."""
    pytest.importorskip("torch")
    cache = {}

    def get(name):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            cache[name] = (folder, save_tiny_hf(name, folder, tiny_tokenizer))
        return cache[name]

    return get
