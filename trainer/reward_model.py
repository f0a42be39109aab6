"""The reward model: the base model's trunk with LoRA, and a linear head reading the last token.

InstructGPT's RM is the SFT model with its unembedding replaced by a scalar output, trained on all
K-choose-2 comparisons of a prompt as one batch element, loss = -mean log sigmoid(r(x, y_w) - r(x, y_l)).
Here the trunk gets a LoRA adapter (the base stays frozen and shared) and the head is trained fully.
Thumbs and ratings add a pointwise term: sigmoid(r(x, y)) is read as the probability that y is good.

Under torchrun the training runs data-parallel (trainer.distributed), like SFT and PPO.

A reward model directory holds `adapter/` (the trunk's PEFT adapter), `head.safetensors` and
`reward_model.json` (the config it was trained with and its metrics).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass
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
    # amounts, and each refresh (init_from) sees the old data again, so a few passes per refresh.
    epochs: int = 3
    # Batch elements per optimizer step; one element is a whole PreferenceGroup (all its pairs, as in
    # InstructGPT, whose batch was 64 prompts) or one PointwiseLabel.
    batch_size: int = 8
    # LoRA rank, scale and dropout on the trunk (Hu et al. 2021; alpha = 2r is the common choice).
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    # Attention projections of Llama-style models, as for the policy adapter.
    lora_target_modules: tuple[str, ...] = ATTENTION_PROJECTIONS
    # Longest (prompt + response) in tokens; longer samples lose their beginning.
    max_length: int = 512
    # Fraction of prompts held out to measure accuracy. Membership is a hash of the prompt (of prompt and
    # answer for pointwise labels), so an item stays on its side across refreshes and never leaks.
    heldout_fraction: float = 0.1
    # Weight of the pointwise (binary cross-entropy on thumbs/ratings) loss beside the pairwise loss.
    pointwise_weight: float = 1.0
    # Gradient-norm clip and AdamW weight decay (common fine-tuning settings).
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    # Seeds the head initialisation, the shuffling and the held-out hash.
    seed: int = 0


# --- Losses -------------------------------------------------------------------------------------------


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_w - r_l), averaged over each group's pairs, then over groups (InstructGPT eq. 1).

    chosen/rejected: [n_pairs] rewards; group: [n_pairs] id of the prompt group each pair belongs to, so a
    prompt ranked over K answers weighs as much as a prompt with a single comparison.
    """
    per_pair = -F.logsigmoid(chosen - rejected)
    _, group = torch.unique(group, return_inverse=True)
    n_groups = int(group.max()) + 1
    sums = torch.zeros(n_groups, dtype=per_pair.dtype).index_add(0, group, per_pair)
    counts = torch.zeros(n_groups, dtype=per_pair.dtype).index_add(0, group, torch.ones_like(per_pair))
    return (sums / counts).mean()


def pointwise_loss(rewards: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of sigmoid(r) against the target probability of being good."""
    return F.binary_cross_entropy_with_logits(rewards, targets)


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


def _is_heldout(key: str, config: RewardModelConfig) -> bool:
    digest = hashlib.sha256(f"{config.seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < config.heldout_fraction


def _split(data: RewardDataset, config: RewardModelConfig) -> tuple[RewardDataset, RewardDataset]:
    train, heldout = RewardDataset(), RewardDataset()
    for group in data.groups:
        (heldout if _is_heldout(repr(group.prompt), config) else train).groups.append(group)
    for label in data.pointwise:
        (heldout if _is_heldout(repr((label.prompt, label.response)), config) else train).pointwise.append(
            label
        )
    if len(train) == 0:  # too little data to spare any: train on everything, measure nothing
        return data, RewardDataset()
    return train, heldout


def _batch_loss(
    model: RewardModel,
    elements: list[PreferenceGroup | PointwiseLabel],
    pointwise_weight: float,
    shares: tuple[float, float] = (1.0, 1.0),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one batch (each distinct answer is scored once) and the rewards it was computed from.

    `shares` weigh the pairwise and the pointwise term: a data-parallel rank's share of the whole batch's
    groups and labels, so that the ranks' gradients sum to the whole batch's.
    """
    samples: dict[tuple[Prompt, str], int] = {}

    def index(prompt: Prompt, response: str) -> int:
        return samples.setdefault((prompt, response), len(samples))

    chosen, rejected, group, points, targets = [], [], [], [], []
    for element_id, element in enumerate(elements):
        if isinstance(element, PreferenceGroup):
            for winner, loser in element.pairs:
                chosen.append(index(element.prompt, winner))
                rejected.append(index(element.prompt, loser))
                group.append(element_id)
        else:
            points.append(index(element.prompt, element.response))
            targets.append(element.target)
    prompts, responses = zip(*samples, strict=True)
    rewards = model(*model.encode(list(prompts), list(responses)))

    out = {}
    loss = rewards.new_zeros(())
    if chosen:
        out["chosen"], out["rejected"] = rewards[chosen], rewards[rejected]
        loss = loss + shares[0] * pairwise_loss(
            out["chosen"], out["rejected"], torch.tensor(group, device=rewards.device)
        )
    if points:
        out["pointwise"], out["targets"] = (
            rewards[points],
            torch.tensor(targets, dtype=rewards.dtype, device=rewards.device),
        )
        loss = loss + shares[1] * pointwise_weight * pointwise_loss(out["pointwise"], out["targets"])
    return loss, out


@torch.no_grad()
def _accuracy(model: RewardModel, data: RewardDataset, batch_size: int) -> dict[str, float]:
    """Held-out pairwise accuracy (r_w > r_l) and pointwise accuracy (sign of r vs. target above 1/2)."""
    model.eval()
    elements = [*data.groups, *data.pointwise]
    right = {"pairwise": 0, "pointwise": 0}
    total = {"pairwise": 0, "pointwise": 0}
    for start in range(0, len(elements), batch_size):
        _, out = _batch_loss(model, elements[start : start + batch_size], 0.0)
        if "chosen" in out:
            right["pairwise"] += int((out["chosen"] > out["rejected"]).sum())
            total["pairwise"] += len(out["chosen"])
        if "pointwise" in out:
            decided = out["targets"] != 0.5  # a neutral label has no right side
            right["pointwise"] += int(((out["pointwise"] > 0) == (out["targets"] > 0.5))[decided].sum())
            total["pointwise"] += int(decided.sum())
    model.train()
    return {f"heldout_{kind}_accuracy": right[kind] / total[kind] for kind in total if total[kind]}


def train_reward_model(
    base_model: Path,
    data: RewardDataset,
    out_dir: Path,
    config: RewardModelConfig,
    init_from: Path | None = None,
) -> dict[str, float]:
    """Train (or continue training) a reward model on `data`, save it to `out_dir`, return its metrics."""
    if len(data) == 0:
        raise ValueError("no preference pairs or pointwise labels to train the reward model on")
    if config.epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {config.epochs}")
    world = init_distributed()
    started = time.monotonic()
    train, heldout = _split(data, config)
    model = RewardModel.create(Path(base_model), config, init_from).train()
    world.fully_shard(model.trunk)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    rng = random.Random(config.seed)
    elements: list[PreferenceGroup | PointwiseLabel] = [*train.groups, *train.pointwise]

    for epoch in range(config.epochs):
        rng.shuffle(elements)
        losses = []
        for start in range(0, len(elements), config.batch_size):
            # This rank's elements of the batch, weighted by their share of its groups and of its labels.
            batch = elements[start : start + config.batch_size]
            own = world.shard(batch)
            shares = tuple(
                sum(isinstance(e, kind) for e in own) / max(1, sum(isinstance(e, kind) for e in batch))
                for kind in (PreferenceGroup, PointwiseLabel)
            )
            if not own:  # a last, short batch can leave a rank without elements: it runs one weighted zero
                own, shares = batch[:1], (0.0, 0.0)  # (every rank runs the same forwards: FSDP needs that)
            loss, _ = _batch_loss(model, own, config.pointwise_weight, shares)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            world.sum_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            losses.append(world.sum(loss.detach()).item())
        log.info("reward model epoch %d/%d: loss %.4f", epoch + 1, config.epochs, sum(losses) / len(losses))

    metrics = {
        "train_loss": sum(losses) / len(losses),  # mean over the last epoch
        **_accuracy(model, heldout, config.batch_size),
        "train_groups": float(len(train.groups)),
        "train_pairs": float(sum(len(g.pairs) for g in train.groups)),
        "train_pointwise": float(len(train.pointwise)),
        "heldout_groups": float(len(heldout.groups)),
        "heldout_pairs": float(sum(len(g.pairs) for g in heldout.groups)),
        "heldout_pointwise": float(len(heldout.pointwise)),
        "weights_on_rank": weights_on_rank(model),
        "seconds": time.monotonic() - started,
    }
    if world.is_main:
        model.save(Path(out_dir), config, metrics)
    world.barrier()
    return metrics
