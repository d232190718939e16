"""Generate the tiny tokenizer and toy datasets that ship with ds-finetune.

The tests and the demo of ds-finetune must run offline (no model or dataset
downloads), so this script builds everything they need from scratch:

* data/tiny/text.jsonl               400 rows of {"text": ...}
* data/tiny/prompt_completion.jsonl  400 rows of {"prompt": ..., "completion": ...}
* data/tiny/chat.jsonl               400 rows of {"messages": [{"role", "content"}, ...]}
* assets/tiny-tokenizer/             byte-level BPE (vocab 512) + chat template

The text is synthetic and highly regular (small arithmetic, counting, word
reversal, templated facts) so that a tiny randomly-initialised model's loss
falls visibly within a few dozen optimizer steps. Everything is seeded; two
runs produce byte-identical files. Run from anywhere:

    .venv/bin/python tools/make_tiny_assets.py
"""

import json
import random
import shutil
import statistics
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR, TOK_DIR = ROOT / "data" / "tiny", ROOT / "assets" / "tiny-tokenizer"
N_ROWS, VOCAB_SIZE = 400, 512
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"] + ROLE_TOKENS
# Each message renders as "<|role|>\n{content}<|end|>\n"; no bos is prepended, so the
# generation prompt "<|assistant|>\n" is a string prefix of the rendered assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

WORDS = ["cat", "dog", "sun", "tree", "bird", "fish", "moon", "star", "rain", "book",
         "lamp", "frog", "milk", "ship", "road", "cake"]
SOUNDS = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa",
          "owl": "hoot", "lion": "roar", "pig": "oink"}
COLORS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black",
          "banana": "yellow", "tomato": "red", "orange": "orange", "plum": "purple"}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer briefly.",
                  "You are a tiny model that answers simple questions."]


def make_qa(rng):
    """Return one synthetic (question, answer) pair."""
    kind = rng.choice(["add", "sub", "count", "reverse", "sound", "color", "repeat", "spell"])
    if kind == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"What is {a} plus {b}?", str(a + b)
    if kind == "sub":
        a = rng.randint(0, 9)
        b = rng.randint(0, a)
        return f"What is {a} minus {b}?", str(a - b)
    if kind == "count":
        start = rng.randint(1, 10)
        end = start + rng.randint(2, 8)
        return f"Count from {start} to {end}.", " ".join(str(i) for i in range(start, end + 1))
    if kind == "reverse":
        w = rng.choice(WORDS)
        return f"Reverse the word {w}.", w[::-1]
    if kind == "sound":
        animal = rng.choice(sorted(SOUNDS))
        return f"What sound does a {animal} make?", f"A {animal} says {SOUNDS[animal]}."
    if kind == "color":
        thing = rng.choice(sorted(COLORS))
        return f"What color is the {thing}?", f"The {thing} is {COLORS[thing]}."
    if kind == "repeat":
        w, n = rng.choice(WORDS), rng.randint(2, 5)
        return f"Repeat the word {w} {n} times.", " ".join([w] * n)
    n = rng.randint(0, 9)
    return f"How do you spell the number {n}?", NUMBER_WORDS[n]


def make_text(rng):
    pairs = [make_qa(rng) for _ in range(rng.randint(1, 3))]
    return {"text": " ".join(f"Q: {q} A: {a}" for q, a in pairs)}


def make_prompt_completion(rng):
    q, a = make_qa(rng)
    return {"prompt": f"Question: {q}\nAnswer:", "completion": f" {a}"}


def make_chat(rng):
    messages = []
    if rng.random() < 0.4:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(rng.choice([1, 1, 2])):
        q, a = make_qa(rng)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": messages}


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def train_tokenizer(texts):
    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", unk_token="<|unk|>",
                                   extra_special_tokens=ROLE_TOKENS, add_bos_token=False,
                                   add_eos_token=False, chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(str(TOK_DIR))


def main():
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(TOK_DIR, ignore_errors=True)  # no stale files from older transformers versions
    TOK_DIR.mkdir(parents=True)
    datasets = {}
    for seed, (name, fn) in enumerate([("text", make_text),
                                       ("prompt_completion", make_prompt_completion),
                                       ("chat", make_chat)]):
        rng = random.Random(1234 + seed)
        datasets[name] = [fn(rng) for _ in range(N_ROWS)]
        write_jsonl(DATA_DIR / f"{name}.jsonl", datasets[name])

    # The tokenizer sees exactly what the model will see, chat rows rendered with the template.
    corpus = [r["text"] for r in datasets["text"]]
    corpus += [r["prompt"] + r["completion"] for r in datasets["prompt_completion"]]
    corpus += ["".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in r["messages"])
               for r in datasets["chat"]]
    train_tokenizer(corpus)

    # ---- verification against the saved files ----
    tok = AutoTokenizer.from_pretrained(str(TOK_DIR))
    assert tok.is_fast and len(tok) == VOCAB_SIZE, (type(tok), len(tok))
    assert tok.bos_token == "<|bos|>" and tok.pad_token == "<|pad|>", tok.special_tokens_map
    sample = datasets["text"][0]["text"]
    enc = tok(sample, return_offsets_mapping=True)
    assert tok.decode(enc["input_ids"]) == sample, "round-trip decode failed"
    assert len(enc["offset_mapping"]) == len(enc["input_ids"])
    assert enc["offset_mapping"][-1][1] == len(sample), "offsets do not cover the text"
    assert tok.unk_token_id not in enc["input_ids"]
    assert tok.convert_ids_to_tokens(tok("<|user|>\nhi<|end|>")["input_ids"])[0] == "<|user|>"

    lengths = {"text": [len(tok(r["text"])["input_ids"]) for r in datasets["text"]],
               "prompt_completion": [len(tok(r["prompt"] + r["completion"])["input_ids"])
                                     for r in datasets["prompt_completion"]],
               "chat": []}
    for row in datasets["chat"]:
        m = row["messages"]
        full = tok.apply_chat_template(m, tokenize=False)
        assert isinstance(full, str) and not full.startswith("<|bos|>"), full
        lengths["chat"].append(len(tok(full)["input_ids"]))
        for i, msg in enumerate(m):
            if msg["role"] == "assistant":
                prefix = tok.apply_chat_template(m[:i], tokenize=False, add_generation_prompt=True)
                assert tok.apply_chat_template(m[:i + 1], tokenize=False).startswith(prefix)

    for name, lens in lengths.items():
        size = (DATA_DIR / f"{name}.jsonl").stat().st_size
        print(f"{name:>18}: {len(datasets[name])} rows, {size} bytes, tokens "
              f"mean {statistics.mean(lens):.1f} min {min(lens)} max {max(lens)}")
    print(f"tokenizer: {TOK_DIR.relative_to(ROOT)} ({len(tok)} tokens, "
          f"files: {', '.join(sorted(p.name for p in TOK_DIR.iterdir()))})")


if __name__ == "__main__":
    main()
