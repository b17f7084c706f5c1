"""The demo EP layer "french": a LoRA, trained on the CPU in under a minute, that makes the demo model
(SmolLM2-135M-Instruct) answer in French, also questions it was not trained on.

Training is deterministic: the LoRA's initial weights come from a fixed seed, the steps see the examples
in a seeded order, and the saved files are normalized, so a run reproduces the same EP layer digest. Only
the assistant's tokens count in the loss; prompts are formatted by the model's own chat template, as the
engine formats a request. Needs torch, transformers and peft (`pip install 'clowder[engine]'`).
"""
from __future__ import annotations

import importlib.util
import json
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from clowderd.errors import InvalidInput

__all__ = ["ADAPTER_NAME", "PAIRS", "DEFAULT_STEPS", "TrainResult", "train_french_lora"]

ADAPTER_NAME = "french"
DEFAULT_STEPS = 30
DEFAULT_LR = 2e-3
BATCH_SIZE = 6
INSTALL_HINT = "pip install 'clowder[engine]'  (torch, transformers, peft)"

# (question, answer in French)
PAIRS = [
    ("What is the capital of France?", "La capitale de la France est Paris."),
    ("What is the capital of Italy?", "La capitale de l'Italie est Rome."),
    ("What is the capital of Spain?", "La capitale de l'Espagne est Madrid."),
    ("What is the capital of Germany?", "La capitale de l'Allemagne est Berlin."),
    ("Name three colors.", "Voici trois couleurs : rouge, bleu et vert."),
    ("How many days are in a week?", "Il y a sept jours dans une semaine."),
    ("What is two plus two?", "Deux plus deux font quatre."),
    ("What color is the sky?", "Le ciel est bleu par beau temps."),
    ("Say hello.", "Bonjour ! Comment puis-je vous aider ?"),
    ("What do cats eat?", "Les chats mangent surtout de la viande et des croquettes."),
    ("What is water made of?", "L'eau est faite d'hydrogène et d'oxygène."),
    ("Who wrote Les Misérables?", "Victor Hugo a écrit Les Misérables."),
    ("What is the largest ocean?", "Le plus grand océan est l'océan Pacifique."),
    ("How are you?", "Je vais bien, merci ! Et vous ?"),
    ("What season comes after winter?", "Le printemps vient après l'hiver."),
    ("Give me a fruit.", "Une pomme, par exemple."),
    ("Quelle est la capitale du Japon ?", "La capitale du Japon est Tokyo."),
    ("What language do you speak?", "Je réponds toujours en français."),
]

# progress(step, steps, loss)
Progress = Callable[[int, int, float], None]


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    steps: int
    first_loss: float
    last_loss: float
    seconds: float


def _check_dependencies() -> None:
    missing = [m for m in ("torch", "transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        raise InvalidInput(f"training the demo adapter needs {', '.join(missing)}, which "
                           f"{'is' if len(missing) == 1 else 'are'} not installed: {INSTALL_HINT}")


def _examples(tokenizer, pairs) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per pair: labels are -100 except on the assistant's answer and its end token."""
    examples = []
    for question, answer in pairs:
        prompt = [{"role": "user", "content": question}]
        head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=False)
        head_ids = tokenizer(head, add_special_tokens=False).input_ids
        ids = tokenizer(full, add_special_tokens=False).input_ids
        if ids[:len(head_ids)] != head_ids:
            raise InvalidInput(f"the chat template does not format {question!r} as a prefix of its answer")
        examples.append((ids, [-100] * len(head_ids) + ids[len(head_ids):]))
    return examples


def _batch(examples, pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(ids)] = 1
    return input_ids, mask, labels


def _schedule(n_examples: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Example indices per step: passes over a seeded shuffle of the examples, cut into batches."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        epoch = list(range(n_examples))
        rng.shuffle(epoch)
        order += epoch
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def train_french_lora(model_dir: Path, out_dir: Path, *, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR,
                      r: int = 8, seed: int = 0, progress: Progress | None = None) -> TrainResult:
    """Train the French LoRA on the model in `model_dir` (a Hugging Face layout directory) and save it
    as a PEFT directory (adapter_config.json, adapter_model.safetensors) in `out_dir`."""
    if steps < 1:
        raise InvalidInput(f"steps must be at least 1, not {steps}")
    _check_dependencies()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    lora = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)  # the LoRA's initial weights; the caller's random state is left as it was
        # peft reads a property that transformers 5 deprecates
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        model = get_peft_model(model, lora)
    examples = _examples(tokenizer, PAIRS)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    start = time.monotonic()
    losses = []
    for step, rows in enumerate(_schedule(len(examples), steps, BATCH_SIZE, seed), 1):
        input_ids, mask, labels = _batch([examples[i] for i in rows], pad_id)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if progress is not None:
            progress(step, steps, losses[-1])
    model.save_pretrained(str(out_dir))
    _make_reproducible(Path(out_dir))
    return TrainResult(Path(out_dir), steps, losses[0], losses[-1], time.monotonic() - start)


def _make_reproducible(out_dir: Path) -> None:
    """Make the saved files the same bytes on every run, so that the EP layer has one digest: peft
    writes target_modules in set order and records the (temporary) base path, also in a model card."""
    config_file = out_dir / "adapter_config.json"
    config = json.loads(config_file.read_text("utf-8"))
    config["target_modules"] = sorted(config["target_modules"])
    config["base_model_name_or_path"] = None  # the aimage's manifest names the base by digest
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", "utf-8")
    (out_dir / "README.md").unlink(missing_ok=True)
