"""How much one PPO round moves a hidden preference, offline: PPO from the base with a fixed reward model on
a round's prompts, then the preferred-answer rate on make demo's pinned questions.

    python bench/ppo_probe.py var/demo-subject/trainer/rounds/000016 --preference subject \
        [--store var/demo-subject/trainer/store.sqlite3] [--set ptx_coef=0.1 --set seed=16]

The round directory gives the reward model (`reward_model`) and the PPO prompts (`round.json`). With
`--store`, PPO's language-model term gets what the loop gives it: the store's corrections and
`--ptx-dialogues` corpus dialogues. `--set NAME=VALUE` sets a PPOConfig field. The rate: every pinned
question (bench/pinned_eval.py: held out, the preference at stake) answered `--answers` times (sampled at
temperature 1, up to 64 tokens; a cut answer does not satisfy), by the base and by the trained policy.
Sampling here is transformers' generate, not the server's engine, so the base's rate differs from
make demo's v0; compare rates of one probe with each other.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from bench.hidden_preferences import PREFERENCES, HiddenPreference, last_question  # noqa: E402
from bench.pinned_eval import EvalConfig, evaluation_questions  # noqa: E402
from trainer.data.store import FeedbackStore  # noqa: E402
from trainer.loop import ptx_texts  # noqa: E402
from trainer.policy.ppo import PPOConfig, train_ppo  # noqa: E402
from trainer.tokens import load_tokenizer  # noqa: E402


def preferred_rate(base_model: Path, adapter: Path | None, preference: HiddenPreference, answers: int) -> float:
    tokenizer = load_tokenizer(base_model)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(base_model)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    torch.manual_seed(0)
    questions = evaluation_questions(preference, EvalConfig())
    satisfied = total = 0
    for start in range(0, len(questions), 25):
        chunk = questions[start : start + 25]
        texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in chunk]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=64,
                                 num_return_sequences=answers, pad_token_id=tokenizer.pad_token_id)
        for index, tokens in enumerate(out[:, batch["input_ids"].shape[1] :]):
            ended = bool((tokens == tokenizer.eos_token_id).any())
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            satisfied += ended and preference.satisfied(last_question(chunk[index // answers]), text)
            total += 1
    return satisfied / total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("round_dir", type=Path, help="a round directory of make demo's trainer (rounds/NNNNNN)")
    parser.add_argument("--preference", choices=sorted(PREFERENCES), default="subject")
    parser.add_argument("--store", type=Path, help="the trainer's store: its corrections go into the ptx term")
    parser.add_argument("--ptx-dialogues", type=int, default=64, help="corpus dialogues in the ptx term")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a PPOConfig field")
    parser.add_argument("--answers", type=int, default=4, help="answers per pinned question")
    parser.add_argument("--base-model", type=Path, default=ROOT / "var" / "models" / "base")
    args = parser.parse_args()

    config = PPOConfig()
    for assignment in args.set:
        name, value = assignment.split("=", 1)
        kind = type(getattr(config, name))
        config = dataclasses.replace(config, **{name: value == "True" if kind is bool else kind(value)})
    prompts = [tuple(tuple(message) for message in prompt)
               for prompt in json.loads((args.round_dir / "round.json").read_text())["prompts"]]
    texts = None
    if args.store is not None:
        demonstrations = FeedbackStore(args.store).training_snapshot().data.demonstrations
        texts = ptx_texts(args.base_model, demonstrations, args.ptx_dialogues, config.seed)
    preference = PREFERENCES[args.preference]
    with tempfile.TemporaryDirectory() as work:
        metrics = train_ppo(args.base_model, args.round_dir / "reward_model", prompts, Path(work) / "adapter",
                            config, ptx_texts=texts)
        trained = preferred_rate(args.base_model, Path(work) / "adapter", preference, args.answers)
    base = preferred_rate(args.base_model, None, preference, args.answers)
    print(f"{args.preference}: base {base:.3f} -> PPO {trained:.3f} ({trained - base:+.3f}); "
          f"KL {metrics.get('kl', float('nan')):.2f}; ptx texts {len(texts or [])}; "
          f"config {dict(s.split('=', 1) for s in args.set)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
