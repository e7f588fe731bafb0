"""A tiny byte-level BPE tokenizer with SmolLM2's ChatML template, built offline in ~10 ms.

Byte-level, so any text tokenizes; vocab ≤ 512 (256 bytes, 3 special tokens, a few merges).
The special tokens sit at SmolLM2's ids: <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2.
"""

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "system user assistant",
    "Hello! How can I help you today? The answer is the number of the things.",
    "What is the capital of France? Paris is the capital of France.",
    "def add(a, b):\n    return a + b\n",
]


@lru_cache(maxsize=1)
def _backend_json() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok.to_str()


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh tiny ChatML tokenizer (each call returns a new object; training is cached)."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_backend_json()),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        chat_template=SMOLLM2_CHAT_TEMPLATE,
    )
    tokenizer.name_or_path = "tiny-chatml"
    return tokenizer
