"""The reward model: the base model's trunk with LoRA, and a linear head reading the last token.

InstructGPT's RM is the SFT model with its unembedding replaced by a scalar output, trained on all
K-choose-2 comparisons of a ranking as one batch element, loss = -mean log sigmoid(r(x, y_w) - r(x, y_l)).
Here the trunk gets a LoRA adapter (the base stays frozen and shared) and the head is trained fully.
Thumbs and ratings add a pointwise term: sigmoid(r(x, y)) is read as the probability that y is good.
How the two terms are weighed: RewardModelConfig.pointwise_weight.

The caller splits the data (trainer.data.split): `train_reward_model` trains on all it is given and only
evaluates `heldout`. Continuing from an earlier model (`init_from`), it trains on the new data plus a
sample of the old (`replay`), so a round's cost follows what is new, not everything ever stored.

Under torchrun the training runs data-parallel (trainer.distributed), like SFT and PPO.

A reward model directory holds `adapter/` (the trunk's PEFT adapter), `head.safetensors` and
`reward_model.json` (the config it was trained with and its metrics).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, PreTrainedTokenizerBase

from trainer.adapters import ATTENTION_PROJECTIONS, lora_config
from trainer.data import PointwiseLabel, PreferenceGroup, Prompt, RewardDataset
from trainer.distributed import init as init_distributed
from trainer.distributed import training_device, weights_on_rank
from trainer.evaluation.intervals import wilson_interval
from trainer.tokens import load_tokenizer, pad_right, sample_ids

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
HEAD_FILE = "head.safetensors"
META_FILE = "reward_model.json"


@dataclass
class RewardModelConfig:
    # Learning rate of AdamW. InstructGPT used 9e-6 for full fine-tuning of a 6B RM; LoRA adapters and a
    # fresh head need far larger steps (1e-4 to 1e-3 is the usual LoRA range).
    lr: float = 5e-4
    # Passes over the data. InstructGPT trains one epoch (more overfits); feedback arrives here in small
    # amounts, so a few passes, over the new data and its replay sample when continuing (init_from).
    epochs: int = 3
    # Batch elements per optimizer step; one element is a whole PreferenceGroup (all pairs of one piece of
    # feedback, as in InstructGPT, whose batch was 64 rankings) or one PointwiseLabel.
    batch_size: int = 8
    # LoRA rank, scale and dropout on the trunk (Hu et al. 2021; alpha = 2r is the common choice).
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    # Attention projections of Llama-style models, as for the policy adapter.
    lora_target_modules: tuple[str, ...] = ATTENTION_PROJECTIONS
    # Longest (prompt + response) in tokens; longer samples lose their beginning.
    max_length: int = 512
    # The loss of a batch is (sum of its groups' losses + pointwise_weight * sum of its labels' losses)
    # / its number of elements, where a group's loss is the mean -log sigmoid(r_w - r_l) over its pairs and
    # a label's is the binary cross-entropy of sigmoid(r) against its target. At 1.0 every piece of feedback
    # weighs the same, a thumb as much as a ranking of K answers, whatever the mix of kinds in a batch.
    pointwise_weight: float = 1.0
    # Continuing from an earlier model (init_from): old elements (`replay`) drawn at random per new one, so
    # 1.0 trains on as many old elements as new. Without the old data the model would drift towards the
    # latest feedback only; with all of it, a round would cost as much as a full retrain.
    replay_ratio: float = 1.0
    # Fewest held-out comparisons (pairs, or pointwise labels other than neutral) for an accuracy to be
    # reported; below it the metrics say heldout_enough = 0. At 20 and an accuracy of 0.8 the 95% interval
    # is already +-0.17 wide (Wilson); fewer tell next to nothing.
    min_heldout: int = 20
    # Gradient-norm clip and AdamW weight decay (common fine-tuning settings).
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    # Seeds the head initialisation, the replay sample and the shuffling.
    seed: int = 0


# --- Losses -------------------------------------------------------------------------------------------


def pairwise_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, group: torch.Tensor, n_groups: int
) -> torch.Tensor:
    """[n_groups] losses: each group's mean of -log sigmoid(r_w - r_l) over its pairs (InstructGPT eq. 1).

    chosen/rejected: [n_pairs] rewards; group: [n_pairs] the group (0 to n_groups - 1) each pair belongs to,
    so that a ranking of K answers weighs as much as a single comparison. Built on the rewards' device.
    """
    per_pair = -F.logsigmoid(chosen - rejected)
    sums = per_pair.new_zeros(n_groups).index_add(0, group, per_pair)
    counts = per_pair.new_zeros(n_groups).index_add(0, group, torch.ones_like(per_pair))
    return sums / counts.clamp(min=1)


def pointwise_loss(rewards: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[n] losses: binary cross-entropy of sigmoid(r) against the target probability of being good."""
    return F.binary_cross_entropy_with_logits(rewards, targets, reduction="none")


# --- Model --------------------------------------------------------------------------------------------


class RewardModel(nn.Module):
    def __init__(
        self, trunk: PeftModel, head: nn.Linear, tokenizer: PreTrainedTokenizerBase, max_length: int
    ):
        super().__init__()
        self.trunk = trunk
        self.head = head  # also the initial value head of PPO (InstructGPT initialises V from the RM)
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def create(
        cls, base_model: Path, config: RewardModelConfig, init_from: Path | None = None
    ) -> RewardModel:
        """A trainable reward model: fresh, or continuing from a saved one (whose LoRA shape it keeps)."""
        if init_from is not None:
            model = cls.load(base_model, init_from, trainable=True)
            model.max_length = config.max_length
            return model
        trunk = AutoModel.from_pretrained(base_model, dtype=torch.float32).to(training_device())
        lora = lora_config(config)
        torch.manual_seed(config.seed)
        head = nn.Linear(trunk.config.hidden_size, 1, device=trunk.device)
        nn.init.normal_(head.weight, std=trunk.config.hidden_size**-0.5 * 0.1)  # starts near r = 0
        nn.init.zeros_(head.bias)
        return cls(get_peft_model(trunk, lora), head, load_tokenizer(base_model), config.max_length)

    @classmethod
    def load(cls, base_model: Path, rm_dir: Path, trainable: bool = False) -> RewardModel:
        rm_dir = Path(rm_dir)
        meta = json.loads((rm_dir / META_FILE).read_text())
        trunk = AutoModel.from_pretrained(base_model, dtype=torch.float32).to(training_device())
        trunk = PeftModel.from_pretrained(trunk, rm_dir / ADAPTER_DIR, is_trainable=trainable)
        weights = load_file(rm_dir / HEAD_FILE)
        head = nn.Linear(weights["weight"].shape[1], 1, device=trunk.device)
        head.load_state_dict(weights)
        model = cls(trunk, head, load_tokenizer(base_model), meta["config"]["max_length"])
        return model.train(trainable)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[batch] rewards, read at each row's last real token (rows are right-padded), on the model's device."""
        device = self.head.weight.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.sum(dim=1) - 1
        return self.head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last]).squeeze(-1)

    def encode(
        self, prompts: list[Prompt], responses: list[str], ended: list[bool] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`ended[i]` False: answer i was cut at the length cap and gets no end-of-sequence token (None: all
        ended)."""
        ended = ended if ended is not None else [True] * len(responses)
        seqs = [
            sample_ids(self.tokenizer, p, r, self.max_length, e)
            for p, r, e in zip(prompts, responses, ended, strict=True)
        ]
        return pad_right(seqs, self.tokenizer.pad_token_id)

    @torch.no_grad()
    def score(
        self, prompts: list[Prompt], responses: list[str], batch_size: int = 32, ended: list[bool] | None = None
    ) -> torch.Tensor:
        """[len(responses)] rewards, float32, in batches; `ended` as in `encode`."""
        was_training = self.training
        self.eval()
        scores = []
        for start in range(0, len(responses), batch_size):
            ids, mask = self.encode(
                prompts[start : start + batch_size],
                responses[start : start + batch_size],
                None if ended is None else ended[start : start + batch_size],
            )
            scores.append(self(ids, mask))
        self.train(was_training)
        return torch.cat(scores) if scores else torch.zeros(0)

    def save(self, out_dir: Path, config: RewardModelConfig, metrics: dict[str, float]) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.trunk.save_pretrained(out_dir / ADAPTER_DIR)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, out_dir / HEAD_FILE
        )
        (out_dir / META_FILE).write_text(json.dumps({"config": asdict(config), "metrics": metrics}, indent=2))


# --- Training -----------------------------------------------------------------------------------------


Element = PreferenceGroup | PointwiseLabel


def batch_loss(
    model: RewardModel, elements: list[Element], pointwise_weight: float, batch_size: int | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of a batch (RewardModelConfig.pointwise_weight says how) and the rewards it came from.

    Each distinct answer is scored once; every tensor is built on the model's device. `batch_size`: the
    whole batch's number of elements when `elements` are one data-parallel rank's share of it, so that the
    ranks' gradients sum to the whole batch's (default: len(elements)).
    """
    samples: dict[tuple[Prompt, str], int] = {}

    def index(prompt: Prompt, response: str) -> int:
        return samples.setdefault((prompt, response), len(samples))

    groups = [e for e in elements if isinstance(e, PreferenceGroup)]
    labels = [e for e in elements if isinstance(e, PointwiseLabel)]
    chosen, rejected, group_of_pair = [], [], []
    for group_id, group in enumerate(groups):
        for winner, loser in group.pairs:
            chosen.append(index(group.prompt, winner))
            rejected.append(index(group.prompt, loser))
            group_of_pair.append(group_id)
    points = [index(label.prompt, label.response) for label in labels]
    prompts, responses = zip(*samples, strict=True)
    rewards = model(*model.encode(list(prompts), list(responses)))
    on_device = partial(torch.tensor, device=rewards.device)

    out = {}
    total = rewards.new_zeros(())
    if chosen:
        out["chosen"], out["rejected"] = rewards[on_device(chosen)], rewards[on_device(rejected)]
        losses = pairwise_loss(out["chosen"], out["rejected"], on_device(group_of_pair), len(groups))
        total = total + losses.sum()
    if points:
        out["pointwise"] = rewards[on_device(points)]
        out["targets"] = on_device([label.target for label in labels], dtype=rewards.dtype)
        total = total + pointwise_weight * pointwise_loss(out["pointwise"], out["targets"]).sum()
    return total / (batch_size or len(elements)), out


def pointwise_pairs(labels: list[PointwiseLabel]) -> list[tuple[PointwiseLabel, PointwiseLabel]]:
    """Disjoint (liked, disliked) pairs of labels on the same prompt: each label in at most one pair."""
    by_prompt: dict[Prompt, tuple[list[PointwiseLabel], list[PointwiseLabel]]] = {}
    for label in labels:
        if label.target != 0.5:
            liked, disliked = by_prompt.setdefault(label.prompt, ([], []))
            (liked if label.target > 0.5 else disliked).append(label)
    return [pair for liked, disliked in by_prompt.values() for pair in zip(liked, disliked, strict=False)]


@torch.no_grad()
def heldout_metrics(
    model: RewardModel, data: RewardDataset, batch_size: int, min_heldout: int
) -> dict[str, float]:
    """Accuracy on held-out feedback, per kind: pairwise (r_w > r_l, per pair) and pointwise (r > 0 iff
    the target is above 1/2; neutral labels have no right side and are not counted).

    A third kind, ranking, asks only whether the model orders answers as users did: the pairwise pairs,
    plus pairs of thumbs/ratings on one prompt, each label used once (a liked answer against a disliked
    one, in arrival order). Pointwise accuracy alone can be won by a constant that matches the base rate
    of thumbs up; ranking cannot, which is why the evaluation gate validates its judge on it.

    Each kind reports its count `heldout_<kind>_n` and, from `min_heldout` comparisons on, its accuracy with
    a Wilson 95% interval (`_low`, `_high`; it treats pairs of one ranking as independent, which they are
    not quite). `heldout_enough` is 1.0 when some accuracy is reported, 0.0 when there is too little
    held-out data to report any.
    """
    model.eval()
    right, total = Counter(), Counter()
    elements = data.elements()
    for start in range(0, len(elements), batch_size):
        _, out = batch_loss(model, elements[start : start + batch_size], 0.0)
        if "chosen" in out:
            right["pairwise"] += int((out["chosen"] > out["rejected"]).sum())
            total["pairwise"] += len(out["chosen"])
        if "pointwise" in out:
            decided = out["targets"] != 0.5
            right["pointwise"] += int(((out["pointwise"] > 0) == (out["targets"] > 0.5))[decided].sum())
            total["pointwise"] += int(decided.sum())
    right["ranking"], total["ranking"] = right["pairwise"], total["pairwise"]
    pairs = pointwise_pairs(data.pointwise)
    if pairs:
        labels = [label for pair in pairs for label in pair]  # liked, disliked, liked, ...
        chunks = [labels[start : start + batch_size] for start in range(0, len(labels), batch_size)]
        scores = torch.cat([
            model(*model.encode([label.prompt for label in chunk], [label.response for label in chunk]))
            for chunk in chunks
        ])  # fmt: skip
        right["ranking"] += int((scores[0::2] > scores[1::2]).sum())
        total["ranking"] += len(pairs)
    model.train()
    metrics = {"heldout_enough": 0.0}
    for kind in ("pairwise", "pointwise", "ranking"):
        metrics[f"heldout_{kind}_n"] = float(total[kind])
        if total[kind] >= min_heldout:
            low, high = wilson_interval(right[kind], total[kind])
            metrics[f"heldout_{kind}_accuracy"] = right[kind] / total[kind]
            metrics[f"heldout_{kind}_low"], metrics[f"heldout_{kind}_high"] = low, high
            metrics["heldout_enough"] = 1.0
    return metrics


def training_elements(
    data: RewardDataset, replay: RewardDataset, config: RewardModelConfig, incremental: bool
) -> list[Element]:
    """All of `data`, and all of `replay` (a full retrain) or, when `incremental`, a random sample of
    replay_ratio elements of it per element of `data`."""
    new, old = data.elements(), replay.elements()
    if incremental:
        old = random.Random(config.seed).sample(old, min(len(old), round(config.replay_ratio * len(new))))
    return new + old


def train_reward_model(
    base_model: Path,
    data: RewardDataset,
    out_dir: Path,
    config: RewardModelConfig,
    init_from: Path | None = None,
    *,
    replay: RewardDataset | None = None,
    heldout: RewardDataset | None = None,
) -> dict[str, float]:
    """Train a reward model on all of `data`, save it to `out_dir`, return its metrics.

    `replay` is data earlier rounds trained on: continuing from `init_from`, a sample of it is mixed in
    (RewardModelConfig.replay_ratio); starting afresh, all of it is trained on. `heldout` is only
    evaluated (heldout_metrics).
    """
    if config.epochs < 1 or config.min_heldout < 1 or config.replay_ratio < 0:
        raise ValueError(f"need epochs >= 1, min_heldout >= 1 and replay_ratio >= 0: {config}")
    replay, heldout = replay or RewardDataset(), heldout or RewardDataset()
    elements = training_elements(data, replay, config, incremental=init_from is not None)
    if not elements:
        raise ValueError("no preference pairs or pointwise labels to train the reward model on")
    world = init_distributed()
    started = time.monotonic()
    model = RewardModel.create(Path(base_model), config, init_from).train()
    world.fully_shard(model.trunk)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    rng = random.Random(config.seed)

    for epoch in range(config.epochs):
        rng.shuffle(elements)
        losses = []
        for start in range(0, len(elements), config.batch_size):
            batch = elements[start : start + config.batch_size]
            own, weight = world.shard(batch), 1.0
            if not own:  # a last, short batch can leave a rank without elements: it runs one weighted zero
                own, weight = batch[:1], 0.0  # (every rank runs the same forwards: FSDP needs that)
            loss, _ = batch_loss(model, own, config.pointwise_weight, len(batch))
            optimizer.zero_grad(set_to_none=True)
            (weight * loss).backward()
            world.sum_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            losses.append(world.sum(weight * loss.detach()).item())
        log.info("reward model epoch %d/%d: loss %.4f", epoch + 1, config.epochs, sum(losses) / len(losses))

    groups = [e for e in elements if isinstance(e, PreferenceGroup)]
    metrics = {
        "train_loss": sum(losses) / len(losses),  # mean over the last epoch
        **heldout_metrics(model, heldout, config.batch_size, config.min_heldout),
        "train_new": float(len(data.elements())),
        "train_replayed": float(len(elements) - len(data.elements())),
        "train_groups": float(len(groups)),
        "train_pairs": float(sum(len(g.pairs) for g in groups)),
        "train_pointwise": float(len(elements) - len(groups)),
        "weights_on_rank": weights_on_rank(model),
        "seconds": time.monotonic() - started,
    }
    if not metrics["heldout_enough"]:
        log.info(
            "reward model: not enough held-out data for an accuracy (%d pairs, %d labels; %d needed)",
            metrics["heldout_pairwise_n"], metrics["heldout_pointwise_n"], config.min_heldout,
        )
    if world.is_main:
        model.save(Path(out_dir), config, metrics)
    world.barrier()
    return metrics
