"""Write a tiny random-weight llama-architecture GGUF that llama.cpp can serve, offline.

Usage (with the llama.cpp venv's python, which has the `gguf` package and llama_cpp):

    .venv-llamacpp/bin/python scripts/make_tiny_gguf.py OUT.gguf

Nothing can be fetched from a model hub on the test machines, so the model is written here,
directly with gguf's GGUFWriter (no Hugging Face model, no converter): architecture "llama",
2 layers, hidden 64, 4 heads, F32 tensors with seeded random weights, and a small
SentencePiece-style vocabulary ("llama" tokenizer model: <unk>, <s>, </s>, the 256 byte-fallback
tokens, and a few hundred word pieces) with a chat template, so that llama.cpp's tokenizer and
`/v1/chat/completions` work. The output rows of the control and byte tokens are zero, so greedy
decoding never picks EOS or a lone byte: a reply is always visible text of the requested length.
Same bytes for the same version of `gguf`: fixed seed. When llama_cpp is importable the script
loads the file with ``llama_cpp.Llama`` and generates a few tokens as a self-check, so a broken
model fails here and not later inside the engine. The text it generates is noise.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np

SEED = 1234
N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 4
N_FF = 128
N_LAYER = 2
N_CTX_TRAIN = 2048
RMS_EPS = 1e-5
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPACE = "\u2581"  # SentencePiece's word-boundary mark

# Each message is its role in <|...|>, a newline, the content and EOS; the prompt for a reply
# ends with the assistant marker. The markers are plain text here (no special tokens).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_WORD_TEXT = """
the a an and or but if then when of to in on at by for with from over under about after
i you he she it we they me my your this that is are was be have has do will can say make go
see know think come give find tell ask work time year people way day world life hand part
place week system program question number night point home water room story fact month book
word side kind head house friend power hour game line end name team idea body level door
engine server router worker manager request response token stream cache memory process queue
model good new first last long great little old big high small large next early young red
blue green white black one two three four five six seven eight nine ten hello thanks please
yes no maybe sure okay well very just also only still even there story tell
"""
_WORDS = _WORD_TEXT.split()


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types of an SPM-style vocabulary.

    llama.cpp's SPM tokenizer merges adjacent pieces only when the merged piece is in the
    vocabulary, so every prefix of each "▁word" is a token: words become single tokens.
    Text outside the pieces (newlines, '<', '|' ...) falls back to the byte tokens.
    """
    T = gguf.TokenType
    tokens = [UNK, BOS, EOS] + [f"<0x{b:02X}>" for b in range(256)]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256
    pieces: list[str] = [SPACE, *"abcdefghijklmnopqrstuvwxyz0123456789.,?!"]
    for word in dict.fromkeys(_WORDS):
        marked = SPACE + word
        pieces += [marked[:i] for i in range(2, len(marked) + 1)]
    normal = list(dict.fromkeys(pieces))
    tokens += normal
    types += [T.NORMAL] * len(normal)
    # Longer pieces score higher, so whole words win over their prefixes.
    scores = [0.0] * (3 + 256) + [float(len(p)) for p in normal]
    return tokens, scores, [int(t) for t in types]


def tensors(n_vocab: int, n_special: int) -> dict[str, np.ndarray]:
    """The llama tensors, in GGUF names, as float32 with numpy shape (out, in)."""
    rng = np.random.default_rng(SEED)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    ones = np.ones(N_EMBD, dtype=np.float32)
    head_dim = N_EMBD // N_HEAD
    out: dict[str, np.ndarray] = {"token_embd.weight": w(n_vocab, N_EMBD)}
    for i in range(N_LAYER):
        out |= {
            f"blk.{i}.attn_norm.weight": ones.copy(),
            f"blk.{i}.attn_q.weight": w(N_EMBD, N_EMBD),
            f"blk.{i}.attn_k.weight": w(N_HEAD_KV * head_dim, N_EMBD),
            f"blk.{i}.attn_v.weight": w(N_HEAD_KV * head_dim, N_EMBD),
            f"blk.{i}.attn_output.weight": w(N_EMBD, N_EMBD),
            f"blk.{i}.ffn_norm.weight": ones.copy(),
            f"blk.{i}.ffn_gate.weight": w(N_FF, N_EMBD),
            f"blk.{i}.ffn_up.weight": w(N_FF, N_EMBD),
            f"blk.{i}.ffn_down.weight": w(N_EMBD, N_FF),
        }
    output = w(n_vocab, N_EMBD)
    # Logit 0 for <unk>, <s>, </s> and the byte tokens; the word pieces' logits are random,
    # and among hundreds of them the greedy pick is always one of those.
    output[:n_special] = 0.0
    out |= {"output_norm.weight": ones.copy(), "output.weight": output}
    return out


def write_gguf(path: Path) -> dict[str, int]:
    tokens, scores, types = vocabulary()
    n_special = 3 + 256
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("svllm-tiny-random-llama")
    writer.add_context_length(N_CTX_TRAIN)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(tokens.index(UNK))
    writer.add_bos_token_id(tokens.index(BOS))
    writer.add_eos_token_id(tokens.index(EOS))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, data in tensors(len(tokens), n_special).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"vocab_size": len(tokens), "bytes": path.stat().st_size}


def self_check(path: Path) -> dict[str, object]:
    """Load the file with llama_cpp and generate a few tokens, plain and as a chat."""
    from llama_cpp import Llama  # noqa: PLC0415 - only where llama_cpp is installed

    llm = Llama(model_path=str(path), n_ctx=256, n_gpu_layers=0, seed=SEED, verbose=False)
    # Any: the result types are llama_cpp's TypedDicts where it is installed, unknown elsewhere.
    plain: Any = llm.create_completion("hello there", max_tokens=8, temperature=0.0)
    chat: Any = llm.create_chat_completion(
        [{"role": "user", "content": "hello there, tell me a story"}], max_tokens=8,
        temperature=0.0,
    )
    text = plain["choices"][0]["text"]
    reply = chat["choices"][0]["message"]["content"]
    if not text or not reply:
        raise SystemExit(f"self-check: empty generation: {text!r} / {reply!r}")
    return {"completion": text, "chat": reply,
            "completion_tokens": plain["usage"]["completion_tokens"]}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} OUT.gguf", file=sys.stderr)
        return 2
    out = Path(argv[1]).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    summary: dict[str, object] = {"path": str(out), **write_gguf(out)}
    if importlib.util.find_spec("llama_cpp") is not None:
        summary["self_check"] = self_check(out)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
