"""A chat checkpoint for the HTTP API tests: the tiny preset's weights with a real BPE tokenizer and
DeepSeek-V2-Chat's template."""

from __future__ import annotations

import json
import threading

from moe_service.checkpoint.loader import save_hf_checkpoint

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
# DeepSeek-V2-Chat's template (tokenizer_config.json on the Hub)
TEMPLATE = ("{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
            "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
            "{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}"
            "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
            "{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
            "{{ 'Assistant:' }}{% endif %}")


def write_chat_checkpoint(path) -> None:
    """The tiny preset's weights, a byte-level BPE trained to exactly its 512 tokens, and the template."""
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    save_hf_checkpoint("tiny", path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [Path(json.__file__).read_text(), Path(threading.__file__).read_text()]
    tok.train_from_iterator(text, trainer)
    assert tok.get_vocab_size() == 512 and tok.token_to_id(BOS) == 1 and tok.token_to_id(EOS) == 2
    tok.save(str(Path(path) / "tokenizer.json"))
    (Path(path) / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": "<pad>",
        "chat_template": TEMPLATE}))
