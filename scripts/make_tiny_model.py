"""Write a tiny random-weight Llama and a BPE tokenizer that vLLM can serve, without a download.

Usage (with the vLLM venv's python, which has torch, transformers and tokenizers):

    .venv-vllm/bin/python scripts/make_tiny_model.py OUT_DIR

Nothing can be fetched from the Hugging Face hub on the test machines, so the model is made
here: a 2-layer LlamaForCausalLM (hidden 256, head_dim 64) with seeded random weights
(``model.safetensors`` + ``config.json``), and a byte-level BPE tokenizer trained offline on a
built-in corpus, saved as a transformers fast tokenizer with a chat template so that
``/v1/chat/completions`` works. Same output for the same versions of the libraries: fixed seeds.
The text it generates is noise; the point is a real vLLM engine going through its real start-up.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

SEED = 1234
VOCAB_TARGET = 1536
BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# Each message is its role token, a newline, the content and EOS; the prompt for a reply ends
# with the assistant token, so the model's EOS ends its turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_WORD_TEXT = """
the a an and or but if then else when while because so of to in on at by for with from into
over under about after before between through during without within along across behind
i you he she it we they me him her us them my your his its our their this that these those
is are was were be been being have has had do does did will would can could should may might
must shall say said make made go went gone take took see saw know knew think thought come came
give gave find found tell told ask asked work worked seem felt try tried leave left call called
time year people way day man woman child world life hand part place case week company system
program question number night point home water room mother area money story fact month lot
right study book eye job word business issue side kind head house service friend father power
hour game line end member law car city community name president team minute idea kid body
information back parent face others level office door health person art war history party
result change morning reason research girl guy moment air teacher force education model
engine server router worker manager request response token stream cache memory process queue
good new first last long great little own other old big high different small large next early
young important few public bad same able red blue green white black bright dark quiet loud
one two three four five six seven eight nine ten hundred thousand
hello hi thanks please yes no maybe sure okay well very really just also only still even
"""
_WORDS = _WORD_TEXT.split()


def corpus(lines: int = 4000) -> Iterator[str]:
    """Seeded pseudo-sentences over a fixed word list, plus digits and punctuation."""
    rng = random.Random(SEED)
    for i in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        words[0] = words[0].capitalize()
        yield " ".join(words) + rng.choice([".", "?", "!", ",", ";", ":"]) + f" {i % 97}"


def make_tokenizer(out: Path) -> int:
    """Train and save the tokenizer; return its vocabulary size (the model's must match)."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    # Byte-level: every input string encodes (no <unk>), and every id decodes.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        special_tokens=[BOS, EOS, UNK, PAD, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS, model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return len(fast)


def make_model(out: Path, vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> None:
    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,  # head_dim 64: a size vLLM's CPU attention kernels support
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(str(out), safe_serialization=True)
    # vLLM reads default sampling parameters from here; keep them plain and explicit.
    GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id).save_pretrained(
        str(out)
    )


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[1]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(str(out))
    make_model(out, vocab, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    # A quick self-check that the chat template renders, so a broken model fails here and not
    # minutes later inside the engine.
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hello there"}], tokenize=False, add_generation_prompt=True
    )
    summary = {"dir": str(out), "vocab_size": vocab, "prompt_tokens": len(tok(prompt).input_ids),
               "files": sorted(p.name for p in out.iterdir())}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
