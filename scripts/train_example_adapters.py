"""Train the example adapters in examples/adapters/ for the embedded default model.

Three answer styles (pirate, shout, json), learned from data this script makes itself:
the frozen model greedily answers a set of questions, and each answer is rewritten by a fixed rule
(pirate words, upper case, a JSON object). Each adapter is then trained with a plain AdamW loop on
chat-template prompts, with the loss on the styled answer and its closing `<|im_end|>` only.

Both kinds of adapter start from a text instruction instead of noise, which is what makes a few
hundred CPU steps enough: a prompt-tuning adapter starts as the embeddings of the text's tokens, a
prefix-tuning adapter as the K/V the model computes for the text (PEFT puts prefix keys in the
cache as stored and starts real tokens at position P, so this is exactly the text, prepended).

Run from the repository root (about 5 minutes on 2 idle CPU cores, longer on a busy machine):

    .venv/bin/python scripts/train_example_adapters.py [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import (
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from prefixserve.default_model import MODEL_NAME, default_model_dir

SEED = 0
THREADS = 2
OUT_DIR = Path(__file__).resolve().parents[1] / "examples" / "adapters"
BASE_MODEL_LABEL = f"{MODEL_NAME} (prefixserve embedded default)"
ANSWER_TOKENS = 32
"""Greedy tokens generated per base answer before it is cut back to whole sentences."""
SAMPLE_TOKENS = 48
BATCH_SIZE = 2

TOPICS = [
    "the moon", "a volcano", "coffee", "the internet", "a library", "music", "a bicycle",
    "the ocean", "a battery", "chess", "bread", "a telescope", "winter", "a forest", "money",
    "friendship", "a river", "the heart", "a camera", "electricity", "a desert", "football",
    "a clock", "the brain", "snow", "a bridge", "a guitar", "a map", "a robot", "the wind",
]  # fmt: skip
TEMPLATES = [
    "What is {}?", "Tell me about {}.", "Why is {} important?", "Describe {} in one sentence.",
    "What is interesting about {}?", "How would you explain {} to a child?",
]  # fmt: skip
HELD_OUT = ["Why do birds sing?", "What is a rainbow?", "How do I make good tea?"]

PIRATE_WORDS = {
    "you": "ye", "your": "yer", "yours": "yers", "is": "be", "are": "be", "am": "be",
    "my": "me", "hello": "ahoy", "hi": "ahoy", "friend": "matey", "friends": "mateys",
    "yes": "aye", "money": "doubloons", "the": "th'", "and": "an'", "for": "fer",
    "of": "o'", "stop": "avast", "treasure": "booty", "people": "landlubbers",
}  # fmt: skip


def pirate(text: str) -> str:
    """Pirate voice: word swaps (keeping a leading capital) between "Arr!" and "Yo ho ho!"."""

    def swap(match: re.Match[str]) -> str:
        word = match.group(0)
        new = PIRATE_WORDS.get(word.lower(), word)
        return new[0].upper() + new[1:] if word[0].isupper() else new

    return f"Arr! {re.sub(r'[A-Za-z]+', swap, text)} Yo ho ho!"


def shout(text: str) -> str:
    return text.upper()


def as_json(text: str) -> str:
    return json.dumps({"answer": text}, ensure_ascii=False)


@dataclass(slots=True)
class AdapterSpec:
    """One example adapter: its PEFT type, the text it starts from, its style rule and schedule."""

    name: str
    peft_type: str
    """PROMPT_TUNING, P_TUNING or PREFIX_TUNING."""
    init_text: str
    """Its token count is the number of virtual tokens; P_TUNING starts random instead."""
    style: Callable[[str], str]
    lr: float
    steps: int


SPECS = [
    AdapterSpec(
        "pirate",
        "PROMPT_TUNING",
        "Answer like a pirate: start with Arr, say ye and be, and end with Yo ho ho!",
        pirate,
        lr=2e-2,
        steps=120,
    ),
    AdapterSpec(
        "shout",
        "PREFIX_TUNING",
        "ANSWER IN ALL UPPER CASE LETTERS.",
        shout,
        lr=3e-2,
        steps=150,
    ),
    # P_TUNING (a random prompt encoder) had not learned this in 120 steps; text-initialized
    # prompt tuning learns it in 60.
    AdapterSpec(
        "json",
        "PROMPT_TUNING",
        'Answer with one line of JSON: {"answer": "..."}',
        as_json,
        lr=3e-2,
        steps=80,
    ),
]


def make_questions() -> list[str]:
    """Two different question templates for every topic, picked by a seeded RNG."""
    rng = random.Random(SEED)
    return [t.format(topic) for topic in TOPICS for t in rng.sample(TEMPLATES, 2)]


def chat_prompt(tok: Tokenizer, question: str) -> list[int]:
    text = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return tok(str(text), add_special_tokens=False).input_ids


def trim_answer(text: str) -> str:
    """Whole sentences only (the first one if it is long enough), so targets end cleanly."""
    text = " ".join(text.split())
    sentences = re.findall(r".+?[.!?](?=\s|$)", text)
    if not sentences:
        return text.rsplit(" ", 1)[0].rstrip(",;:") + "."
    kept = sentences[0]
    if len(kept.split()) < 6 and len(sentences) > 1:
        kept += sentences[1]
    return kept.strip()


@torch.inference_mode()
def base_answers(model: PreTrainedModel, tok: Tokenizer, questions: list[str]) -> list[str]:
    """The frozen model's greedy answers (untrimmed), batched with left padding."""
    prompts = [chat_prompt(tok, q) for q in questions]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(  # type: ignore[operator]  # transformers types it via __getattr__
        input_ids=ids, attention_mask=mask, max_new_tokens=ANSWER_TOKENS, do_sample=False
    )
    return [str(tok.decode(row[width:], skip_special_tokens=True)).strip() for row in out]


@dataclass(slots=True)
class Example:
    token_ids: list[int]
    """The chat prompt followed by the styled answer and `<|im_end|>`."""
    target_start: int
    """Index of the first answer token: the loss covers token_ids[target_start:]."""


def make_examples(tok: Tokenizer, pairs: list[tuple[str, str]], spec: AdapterSpec) -> list[Example]:
    examples = []
    for question, answer in pairs:
        prompt = chat_prompt(tok, question)
        target = tok(spec.style(answer) + tok.eos_token, add_special_tokens=False).input_ids
        examples.append(Example(prompt + target, len(prompt)))
    return examples


def peft_config(spec: AdapterSpec, num_tokens: int) -> PeftConfig:
    if spec.peft_type == "PROMPT_TUNING":
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_tokens)
    if spec.peft_type == "P_TUNING":
        return PromptEncoderConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_tokens, encoder_hidden_size=256
        )
    if spec.peft_type == "PREFIX_TUNING":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_tokens)
    raise ValueError(f"unsupported peft_type {spec.peft_type!r} for adapter {spec.name!r}")


@torch.no_grad()
def init_from_text(peft_model: PeftModel, base: PreTrainedModel, text_ids: list[int]) -> None:
    """Start the adapter as the text `text_ids`: its token embeddings (prompt tuning), or the K/V
    the model computes for it (prefix tuning), laid out [P, layers, 2 (key, value), Hkv, D]."""
    weight = peft_model.get_parameter("prompt_encoder.default.embedding.weight")
    ids = torch.tensor([text_ids])
    if peft_model.peft_config["default"].peft_type == "PROMPT_TUNING":
        weight.copy_(base.get_input_embeddings()(ids)[0])
        return
    cache = base(input_ids=ids, use_cache=True).past_key_values
    layers = [(cache.layers[i].keys, cache.layers[i].values) for i in range(len(cache.layers))]
    kv = torch.stack([torch.stack(pair) for pair in layers])  # [L, 2, 1, Hkv, P, D]
    weight.copy_(kv[:, :, 0].permute(3, 0, 1, 2, 4).reshape(len(text_ids), -1))


def batch_loss(model: PeftModel, batch: list[Example], pad_id: int) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens; logits only for the positions that need them."""
    width = max(len(e.token_ids) for e in batch)
    ids = torch.tensor([e.token_ids + [pad_id] * (width - len(e.token_ids)) for e in batch])
    mask = torch.tensor([[1] * len(e.token_ids) + [0] * (width - len(e.token_ids)) for e in batch])
    labels = torch.full_like(ids, -100)
    for row, e in enumerate(batch):
        labels[row, e.target_start : len(e.token_ids)] = ids[row, e.target_start : len(e.token_ids)]
    # Position j predicts token j + 1: keep the logits from the first answer's predecessor on.
    keep = width - min(e.target_start for e in batch) + 1
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, width - keep + 1 :].flatten()
    )


def train(model: PeftModel, examples: list[Example], spec: AdapterSpec, pad_id: int) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / (spec.steps + 1))
    rng = random.Random(SEED)
    order: list[Example] = []
    losses: list[float] = []
    progress = tqdm(range(spec.steps), desc=f"train {spec.name}")
    for _ in progress:
        if len(order) < BATCH_SIZE:
            order += rng.sample(examples, len(examples))
        batch, order = order[:BATCH_SIZE], order[BATCH_SIZE:]
        loss = batch_loss(model, batch, pad_id)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    return sum(losses[-10:]) / len(losses[-10:])


def save(model: PeftModel, out_dir: Path) -> None:
    """`save_pretrained` in fp32, then replace the local model path PEFT records with a label
    and drop the empty model card it writes (it names that path too)."""
    model.save_pretrained(str(out_dir))
    (out_dir / "README.md").unlink(missing_ok=True)
    config_path = out_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = BASE_MODEL_LABEL
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@torch.inference_mode()
def greedy(model: PeftModel, tok: Tokenizer, question: str) -> str:
    """PEFT's own greedy answer, one prompt at a time: PEFT ignores `position_ids`, so in a
    left-padded batch the padded rows' prompt-tuning answers change."""
    prompt = chat_prompt(tok, question)
    ids = torch.tensor([prompt])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=SAMPLE_TOKENS,
        do_sample=False,
    )
    return str(tok.decode(out[0, len(prompt) :], skip_special_tokens=True))


def load_base(model_dir: Path) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model


def train_adapter(
    spec: AdapterSpec, model_dir: Path, tok: Tokenizer, pairs: list[tuple[str, str]]
) -> float:
    """Train one adapter on a fresh copy of the base model and save it; returns the final loss."""
    base = load_base(model_dir)
    text_ids = tok(spec.init_text, add_special_tokens=False).input_ids
    model = get_peft_model(base, peft_config(spec, len(text_ids)))
    if spec.peft_type != "P_TUNING":
        init_from_text(model, base, text_ids)
    model.print_trainable_parameters()
    loss = train(model, make_examples(tok, pairs, spec), spec, tok.pad_token_id)
    save(model, OUT_DIR / spec.name)
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=[s.name for s in SPECS], help="adapters")
    args = parser.parse_args()
    specs = [s for s in SPECS if not args.only or s.name in args.only]
    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    start, cpu_start = time.perf_counter(), time.process_time()

    model_dir = default_model_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = load_base(model_dir)
    questions = make_questions()
    print(f"generating {len(questions) + len(HELD_OUT)} base answers ...", flush=True)
    answers = base_answers(base, tok, questions + HELD_OUT)
    pairs = [(q, trim_answer(a)) for q, a in zip(questions, answers, strict=False)]
    print(f"  e.g. {pairs[0]}")

    losses = {spec.name: train_adapter(spec, model_dir, tok, pairs) for spec in specs}
    train_time, cpu_time = time.perf_counter() - start, time.process_time() - cpu_start
    for name, loss in losses.items():
        print(f"{name}: final loss {loss:.3f}, saved to {OUT_DIR / name}")
    print(f"data + training: {train_time:.0f} s wall, {cpu_time:.0f} s CPU ({THREADS} threads)")

    for question, answer in zip(HELD_OUT, answers[len(questions) :], strict=True):
        print(f"\nQ: {question}\n  base  : {answer}")
        for spec in specs:
            # Prompt learning wraps the model without changing its modules: reuse it.
            adapted = PeftModel.from_pretrained(base, OUT_DIR / spec.name)
            print(f"  {spec.name:6}: {greedy(adapted, tok, question)}")
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    print(f"\ntotal: {wall:.0f} s wall, {cpu:.0f} s CPU")


if __name__ == "__main__":
    main()
