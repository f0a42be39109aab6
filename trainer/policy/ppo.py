"""PPO with a KL penalty and a pretraining (ptx) term: InstructGPT's RL step, on a LoRA adapter.

objective = E_(x,y)~pi [ r(x, y) - beta * log(pi(y|x) / pi_ref(y|x)) ] + gamma_ptx * E_x~D_ptx [ log pi(x) ]

The policy is a PEFT LoRA adapter over the frozen base model. The reference policy pi_ref is the SFT
policy when an SFT adapter is given (`reference_adapter`: loaded frozen beside the policy's adapter, and
the policy starts from it, as in InstructGPT), else the base model itself (the adapter switched off); either
way there is no second copy of the base. A linear value head on the policy's last hidden state starts from
the reward model's head (InstructGPT initialises the value function from the RM). Rollouts come from
trainer.policy.rollout (transformers' generate, or a vLLM engine refreshed with the adapter after each
update); their log-probabilities are always recomputed here in torch. What is saved is the policy adapter
alone, which vLLM loads as it is. The losses are in trainer/policy/ppo_losses.py.

Each step is checkpointed when a checkpoint directory is given (trainer.policy.checkpoint), and the same call
runs data-parallel under torchrun, or with the frozen weights sharded under `accelerate launch --use_fsdp`
(trainer.distributed).
"""

from __future__ import annotations

import copy
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

from trainer.adapters import ATTENTION_PROJECTIONS, lora_config
from trainer.data import Prompt
from trainer.distributed import World, gather_rows, rows_of_rank, training_device, weights_on_rank
from trainer.distributed import init as init_distributed
from trainer.policy import checkpoint
from trainer.policy.ppo_losses import (
    KLController,
    compute_gae,
    entropy_from_logits,
    explained_variance,
    kl_penalized_rewards,
    kl_per_token,
    masked_mean,
    policy_loss,
    value_loss,
    whiten,
)
from trainer.policy.rollout import HFRollout, RolloutBackend, VllmRollout, ended
from trainer.reward.reward_model import RewardModel
from trainer.tokens import load_tokenizer, pad_right, prompt_ids

log = logging.getLogger(__name__)


@dataclass
class PPOConfig:
    """What `make up` runs: the loop passes this config's defaults, with only its seed (and the round-size
    settings TRAINER_PPO_*, when set) changed; the learning tests (tests/trainer/policy/test_ppo.py) train
    with exactly these defaults, so the figures they report (docs/training.md) are those of the shipped
    config.
    """

    # --- Schedule ---
    # PPO iterations (one rollout batch, then ppo_epochs of updates on it) per train_ppo call.
    steps: int = 20
    # Rollouts per iteration (InstructGPT: 512 episodes; TRL's old default 64; small for CPU here).
    rollout_batch_size: int = 16
    # Rollouts per gradient step (InstructGPT: 64; TRL: 16 of 64 and 4 epochs).
    minibatch_size: int = 8
    # Passes over each rollout batch (TRL's default 4).
    ppo_epochs: int = 4
    # --- Sampling ---
    # Response length cap. An answer cut there is scored as cut (without end-of-sequence: trainer.tokens).
    # Of the corpus answers the tiny base learned from (median 11 tokens), 48 cuts 0.5% and 32 cut 3.4%:
    # room for a length preference to be learned rather than run into the cap. No penalty for a missing
    # end-of-sequence (TRL's missing_eos_penalty): in the learning tests 0 and 1 of 320 rollouts were cut;
    # the `truncated` metric (share cut, per step) shows if a policy starts to ramble into the cap.
    max_new_tokens: int = 48
    # Sampling temperature, also applied to the logits PPO trains on so the ratio is that of the sampler.
    temperature: float = 1.0
    # Who samples the rollouts (trainer.policy.rollout): "vllm" runs a vLLM engine of the trainer's own, with
    # the policy adapter reloaded after every update; "hf" runs transformers' generate on the policy being
    # trained (no engine to start: quick experiments and tests). A vLLM engine takes about 20 s to start on
    # the CPU, once per train_ppo call unless the caller passes a running one (the loop keeps one across
    # rounds); bench/rollout_bench.py measures what it gains per step.
    rollout_backend: Literal["hf", "vllm"] = "vllm"
    # How the vLLM engine gets each update (trainer.policy.rollout.VllmRollout): "weights" reloads the base
    # weights with the adapter merged in (fastest on the CPU: vLLM's CPU LoRA kernels cost 2.6x per batch),
    # "lora" loads the adapter alone under a new LoRA id (writes far less for large models).
    vllm_sync: Literal["weights", "lora"] = "weights"
    # GPU memory fraction of the vLLM engine's weights and KV cache (the update shares the device);
    # on the CPU the KV cache takes VLLM_CPU_KVCACHE_SPACE GiB instead.
    vllm_gpu_memory_utilization: float = 0.3
    # --- Optimisation ---
    # Adam learning rate for the adapter and value head. InstructGPT fine-tuned all weights at ~1e-5; a
    # rank-8 LoRA needs far more. Measured on the tiny base (at beta 0.02): 1e-4 barely moved in 20 steps,
    # 1e-3 learned a length preference in 20 steps (KL ~10 nats), 3e-3 drifted (entropy doubled, KL ~40
    # nats). With beta 0.3 (below), 1e-3 learns both test preferences in the 20 steps above.
    lr: float = 1e-3
    # Gradient-norm clip (common practice; TRL leaves it off by default).
    max_grad_norm: float = 1.0
    # --- PPO (Schulman et al. 2017; values as in TRL's former PPOConfig) ---
    cliprange: float = 0.2  # clip of the probability ratio
    cliprange_value: float = 0.2  # clip of the value update around its rollout-time estimate
    vf_coef: float = 0.1  # weight of the value loss (TRL's default)
    gamma: float = 1.0  # discount: the episode is one response, so none (TRL)
    lam: float = 0.95  # GAE lambda (TRL)
    whiten_advantages: bool = True  # zero-mean, unit-variance advantages per rollout batch (TRL)
    # Entropy bonus weight; InstructGPT and TRL use none, the KL penalty already keeps the policy broad.
    entropy_coef: float = 0.0
    # --- KL penalty ---
    # beta of the per-token penalty beta * log(pi / pi_ref). InstructGPT's 0.02 drifted on the tiny base at
    # this lr: ~17 nats per answer in 20 steps, with garbled answers. Measured in the learning tests (20
    # steps, 384 held-out answers): beta 0.2 reached 6.3-10.5 nats (wording; the run moved with
    # floating-point sums), 0.3 reached 2.3-3.1 nats (length) and 6.2-7.1 (wording) while raising the
    # preferred answers' rate by 4.5-13.8 standard errors: under the gate's KL bound (10) with margin.
    kl_coef: float = 0.3
    # Per-token KL estimator: k1 is InstructGPT's log-ratio; k3 is never negative (see ppo_losses).
    kl_estimator: Literal["k1", "k3"] = "k1"
    # Adapt beta towards kl_target nats per response over kl_horizon rollouts (Ziegler et al. 2019;
    # TRL's former AdaptiveKLController defaults: target 6, horizon 10000).
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10_000
    # --- Pretraining mix (PPO-ptx) ---
    # gamma of the ptx term, added as gamma * (mean token NLL on ptx_texts). InstructGPT's 27.8 weighs
    # differently scaled losses; ours are per-token means with whitened advantages, where the LM term
    # competes directly with the policy gradient. Measured on the tiny base (length-preferring RM, 20
    # steps, 3 seeds): held-out reward gain 1.5-1.9 without ptx, 1.2-1.6 at 0.1, 0.7-1.2 at 0.2, 0.5-0.75
    # at 0.5. Here the "pretraining" text is the corpus the base learned its answers from, so the term pulls
    # back towards the base's answers, and its gradient shares max_grad_norm's clip with the policy's. On a
    # content preference (make demo's `subject`, a round's reward model and prompts, 400 pinned answers, 2
    # seeds) the preferred-answer rate went from 0.41 (base) to 0.52-0.56 without ptx, 0.55 at 0.01, 0.48 at
    # 0.03 and 0.38-0.44 at 0.1: at 0.1 the round learned nothing. 0.01 keeps an anchor at no measured cost.
    ptx_coef: float = 0.01
    ptx_batch_size: int = 8  # ptx texts per gradient step
    ptx_max_length: int = 256  # tokens per ptx text
    # --- LoRA adapter of the policy (q/k/v/o projections: what vLLM's LoRA support loads) ---
    lora_r: int = 8  # must not exceed the server's max_lora_rank
    lora_alpha: int = 16
    lora_dropout: float = 0.0  # dropout would make the first minibatch's ratio differ from 1
    lora_target_modules: tuple[str, ...] = ATTENTION_PROJECTIONS
    # Seeds the adapter initialisation; step_seed(seed, step) seeds each step's prompt sampling, response
    # sampling, minibatch order and ptx draws.
    seed: int = 0


def step_seed(seed: int, step: int) -> int:
    """The seed of all random choices of one PPO step: a resumed run draws what an uninterrupted one would."""
    return seed * 1_000_003 + step


@dataclass
class Rollouts:
    """Queries left-padded to query_len, responses right-padded after them: response tokens line up."""

    input_ids: torch.Tensor  # [batch, query_len + response_len]
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    query_len: int

    @property
    def response_mask(self) -> torch.Tensor:
        return self.attention_mask[:, self.query_len :]

    def rows(self, index: torch.Tensor) -> Rollouts:
        return Rollouts(
            self.input_ids[index], self.attention_mask[index], self.position_ids[index], self.query_len
        )

    def to(self, device: torch.device) -> Rollouts:
        return Rollouts(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.query_len,
        )


def pack(queries: list[list[int]], responses: list[list[int]], pad_id: int) -> Rollouts:
    query_len, response_len = max(map(len, queries)), max(map(len, responses))
    input_ids = torch.full((len(queries), query_len + response_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, (query, response) in enumerate(zip(queries, responses, strict=True)):
        span = slice(query_len - len(query), query_len + len(response))
        input_ids[row, span] = torch.tensor(query + response, dtype=torch.long)
        attention_mask[row, span] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
    return Rollouts(input_ids, attention_mask, position_ids, query_len)


REFERENCE = "reference"  # the name of the frozen SFT adapter inside the policy's PeftModel


def load_policy(
    base_model: Path,
    config: PPOConfig,
    init_adapter: Path | None = None,
    reference_adapter: Path | None = None,
) -> PeftModel:
    """The base model with the trainable policy adapter ("default") and, if given, the frozen reference.

    The policy adapter starts from `init_adapter` (e.g. the served version), else from the reference (SFT)
    adapter, else fresh (LoRA's B = 0: the base model itself).
    """
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32).to(training_device())
    start = init_adapter or reference_adapter
    if start is not None:
        policy = PeftModel.from_pretrained(model, start, is_trainable=True)
    else:
        torch.manual_seed(config.seed)
        lora = lora_config(config, task_type="CAUSAL_LM")
        policy = get_peft_model(model, lora)
    if reference_adapter is not None:
        policy.load_adapter(reference_adapter, adapter_name=REFERENCE, is_trainable=False)
    return policy


@contextmanager
def reference_policy(policy: PeftModel) -> Iterator[None]:
    """Inside, `policy` computes as the reference: the SFT adapter if one is loaded, else the bare base."""
    if REFERENCE not in policy.peft_config:
        with policy.disable_adapter():
            yield
        return
    policy.set_adapter(REFERENCE)
    try:
        yield
    finally:
        policy.set_adapter("default")  # also makes the policy adapter trainable again, and the SFT one not


def make_rollout(config: PPOConfig, base_model: Path, lora_rank: int) -> RolloutBackend:
    """A rollout backend of config.rollout_backend for policies of LoRA rank `lora_rank` or less."""
    if config.rollout_backend == "hf":
        return HFRollout(load_tokenizer(base_model))
    if config.rollout_backend == "vllm":
        return VllmRollout(
            base_model, lora_rank, config.vllm_sync, gpu_memory_utilization=config.vllm_gpu_memory_utilization
        )
    raise ValueError(f"unknown rollout backend {config.rollout_backend!r}")


def policy_forward(
    policy: PeftModel, value_head: nn.Linear, batch: Rollouts, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probability of each response token, value of the state before it, and the entropy there.

    All three are [batch, response_len]; the hidden state at position t predicts token t + 1.
    """
    response_len = batch.input_ids.shape[1] - batch.query_len
    out = policy.get_base_model()(  # LoRA layers are inside it; disable_adapter() still applies
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        output_hidden_states=True,
        logits_to_keep=response_len + 1,  # no logits over the query
    )
    hidden = out.hidden_states[-1][:, batch.query_len - 1 : -1]  # the last layer's, after the final norm
    logits = out.logits[:, :-1].float() / temperature
    response = batch.input_ids[:, batch.query_len :]
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
    return logprobs, value_head(hidden).squeeze(-1), entropy_from_logits(logits)


def lm_loss(policy: PeftModel, seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """Mean next-token negative log-likelihood of the sequences (the ptx term)."""
    ids, mask = (t.to(policy.device) for t in pad_right(seqs, pad_id))
    return policy(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss


def train_ppo(
    base_model: Path,
    reward_model_dir: Path,
    prompts: list[Prompt],
    out_adapter_dir: Path,
    config: PPOConfig,
    init_adapter: Path | None = None,
    reference_adapter: Path | None = None,
    ptx_texts: list[str] | None = None,
    on_step: Callable[[dict], None] | None = None,
    checkpoint_dir: Path | None = None,
    rollout: RolloutBackend | None = None,
) -> dict[str, float]:
    """Run config.steps PPO iterations on `prompts`; save the adapter; return the last step's metrics.

    `init_adapter` (e.g. the served version) is continued with its own LoRA shape. The reference policy is
    the SFT adapter `reference_adapter` when given (the policy then starts from it unless `init_adapter`
    is given too), else the base model, so the KL penalty keeps measuring the distance from the same
    reference across versions. The value head starts from the reward model's head.

    With `checkpoint_dir`, every completed step is checkpointed there and a call that finds a checkpoint
    continues after its step (same config required). `rollout` is a running backend to use (the caller
    keeps it); without one, a backend of config.rollout_backend is started and closed here. Under torchrun
    each rank does its share of every batch (trainer.distributed); only rank 0 writes files.
    """
    if not prompts:
        raise ValueError("PPO needs at least one prompt")
    if config.steps < 1:
        raise ValueError(f"steps must be at least 1, got {config.steps}")
    world = init_distributed()
    last_minibatch = config.rollout_batch_size % config.minibatch_size or config.minibatch_size
    if min(config.minibatch_size, last_minibatch, config.ptx_batch_size) < world.size:
        raise ValueError(f"every minibatch and ptx batch needs a row for each of the {world.size} ranks")
    base_model = Path(base_model)
    tokenizer = load_tokenizer(base_model)
    pad_id = tokenizer.pad_token_id
    reward_model = RewardModel.load(base_model, Path(reward_model_dir))
    world.fully_shard(reward_model.trunk)
    queries = [prompt_ids(tokenizer, p) for p in prompts]
    ptx = []  # modelled exactly as given: render dialogues with the chat template before passing them
    if ptx_texts and config.ptx_coef > 0:
        ptx = [tokenizer(t, add_special_tokens=False).input_ids[: config.ptx_max_length] for t in ptx_texts]

    # The policy, value head, optimizer and KL coefficient: fresh, or as the last checkpoint left them.
    resume_from = checkpoint.latest(checkpoint_dir) if checkpoint_dir is not None else None
    if resume_from is not None:
        init_adapter = resume_from / checkpoint.ADAPTER_DIR
    policy = world.fully_shard(load_policy(base_model, config, init_adapter, reference_adapter))
    policy.eval()  # no dropout anywhere: gradients still flow, and old and new log-probs agree at first
    value_head = copy.deepcopy(reward_model.head).requires_grad_(True)
    params = [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = torch.optim.Adam(params, lr=config.lr)
    kl_ctl = KLController(config.kl_coef, config.kl_target if config.adaptive_kl else None, config.kl_horizon)
    first_step, metrics = 1, {}
    if resume_from is not None:
        state = checkpoint.load_state(resume_from)
        if state["config"] != asdict(config):
            raise ValueError(f"{resume_from} was written with another PPO config; remove it to start over")
        value_head.load_state_dict(state["value_head"])
        optimizer.load_state_dict(state["optimizer"])
        kl_ctl.value = state["kl_coef"]
        first_step, metrics = state["step"] + 1, state["metrics"]
        log.info("ppo resumes after step %d from %s", state["step"], resume_from)

    own_rollout = rollout is None
    if own_rollout:  # an init adapter keeps its own rank
        rollout = make_rollout(config, base_model, policy.peft_config["default"].r)
    try:
        rollout.refresh(policy)
        for step in range(first_step, config.steps + 1):
            metrics = _ppo_step(
                step, config, world, policy, value_head, optimizer, params, kl_ctl, reward_model, rollout,
                prompts, queries, ptx, pad_id, tokenizer,
            )  # fmt: skip
            log.info("ppo step %d/%d: %s", step, config.steps, {k: round(v, 4) for k, v in metrics.items()})
            if checkpoint_dir is not None:
                if world.is_main:
                    checkpoint.save(checkpoint_dir, step, policy, {
                        "step": step, "config": asdict(config), "metrics": metrics, "kl_coef": kl_ctl.value,
                        "value_head": value_head.state_dict(), "optimizer": optimizer.state_dict(),
                    })  # fmt: skip
                world.barrier()
            if on_step is not None:
                on_step(metrics)
    finally:
        if own_rollout:
            rollout.close()

    if world.is_main:
        Path(out_adapter_dir).mkdir(parents=True, exist_ok=True)
        policy.save_pretrained(out_adapter_dir, selected_adapters=["default"])
    world.barrier()
    return metrics


def _ppo_step(
    step: int,
    config: PPOConfig,
    world: World,
    policy: PeftModel,
    value_head: nn.Linear,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    kl_ctl: KLController,
    reward_model: RewardModel,
    rollout: RolloutBackend,
    prompts: list[Prompt],
    queries: list[list[int]],
    ptx: list[list[int]],
    pad_id: int,
    tokenizer,
) -> dict[str, float]:
    """One PPO iteration: rollouts, scoring, ppo_epochs of updates, rollout refresh; returns its metrics.

    Every rank draws the same random choices from step_seed(seed, step) and computes its rows (`mine`) of
    each batch; rows are gathered wherever the whole batch is needed.
    """
    started = time.monotonic()
    rng = torch.Generator().manual_seed(step_seed(config.seed, step))
    n = config.rollout_batch_size
    mine = rows_of_rank(n, world)

    # Rollouts: a batch of prompts (with replacement) and one sampled response each, every row with a seed
    # of its own. Each rank samples its rows; then every rank holds the whole batch.
    picked = torch.randint(len(prompts), (n,), generator=rng).tolist()
    seeds = torch.randint(2**31 - 1, (n,), generator=rng).tolist()
    my_queries, my_seeds = [queries[picked[i]] for i in mine], [seeds[i] for i in mine]
    local = rollout.generate(my_queries, 1, config.max_new_tokens, config.temperature, my_seeds)
    responses: list[list[int]] = [[] for _ in range(n)]
    for rank, shard in enumerate(world.gather(local)):
        responses[rank :: world.size] = shard
    batch = pack([queries[i] for i in picked], responses, pad_id).to(policy.device)
    mask = batch.response_mask
    finished = [ended(response, rollout.stop_ids) for response in responses]
    rollout_done = time.monotonic()

    # Score: the reward model reads each (prompt, response) at its last token, an answer cut at the length
    # cap without the end-of-sequence token it never emitted. In chunks of at most a minibatch (bounding the
    # memory of the logits below), as many on every rank (trainer.distributed).
    chunks = world.chunks(mine, config.minibatch_size, n)
    local_scores = [
        reward_model.score(
            [prompts[picked[i]] for i in c],
            [tokenizer.decode(responses[i], skip_special_tokens=True) for i in c],
            batch_size=len(c),
            ended=[finished[i] for i in c],
        )
        for c in chunks
    ]
    scores = gather_rows(torch.cat(local_scores), mine, n, world)

    # Log-probs and values of the policy that sampled (the "old" policy), and the reference log-probs.
    with torch.no_grad():
        old = [policy_forward(policy, value_head, batch.rows(c), config.temperature) for c in chunks]
        with reference_policy(policy):
            ref = [policy_forward(policy, value_head, batch.rows(c), config.temperature)[0] for c in chunks]
    old_logprobs = gather_rows(torch.cat([o[0] for o in old]), mine, n, world)
    old_values = gather_rows(torch.cat([o[1] for o in old]), mine, n, world)
    ref_logprobs = gather_rows(torch.cat(ref), mine, n, world)

    # Rewards per token: -beta * KL to the reference on every token, the RM score on the last one.
    kl_coef = kl_ctl.value
    kl = kl_per_token(old_logprobs, ref_logprobs, config.kl_estimator)
    rewards = kl_penalized_rewards(kl, scores, mask, kl_coef)

    # Advantages and returns by GAE; whitened advantages make the step size independent of reward scale.
    advantages, returns = compute_gae(rewards, old_values, mask, config.gamma, config.lam)
    if config.whiten_advantages:
        advantages = whiten(advantages, mask)
    scoring_done = time.monotonic()

    # Update: ppo_epochs passes of shuffled minibatches; clipped surrogate + clipped value loss - entropy
    # bonus + ptx (language-model loss on pretraining-like text). Each rank's loss is weighted by its share
    # of the minibatch's tokens, so the summed gradient is that of the whole minibatch's loss.
    stats = defaultdict(list)
    for _ in range(config.ppo_epochs):
        for mb in torch.randperm(n, generator=rng).split(config.minibatch_size):
            own = world.shard(mb)
            share = mask[own].sum() / mask[mb].sum()
            logprobs, values, entropy = policy_forward(
                policy, value_head, batch.rows(own), config.temperature
            )
            pg_loss, pg_clipfrac = policy_loss(
                logprobs, old_logprobs[own], advantages[own], mask[own], config.cliprange
            )
            vf_loss, vf_clipfrac = value_loss(
                values, old_values[own], returns[own], mask[own], config.cliprange_value
            )
            mean_entropy = masked_mean(entropy, mask[own])
            loss = share * (pg_loss + config.vf_coef * vf_loss - config.entropy_coef * mean_entropy)
            approx_kl = masked_mean(kl_per_token(old_logprobs[own], logprobs.detach(), "k3"), mask[own])
            named = {"policy_loss": pg_loss, "value_loss": vf_loss, "clipfrac": pg_clipfrac,
                     "value_clipfrac": vf_clipfrac, "entropy": mean_entropy, "approx_kl": approx_kl}  # fmt: skip
            named = {name: share * value.detach() for name, value in named.items()}
            if ptx:
                drawn = torch.randint(len(ptx), (config.ptx_batch_size,), generator=rng).tolist()
                own_ptx = world.shard(drawn)
                ptx_share = sum(len(ptx[i]) - 1 for i in own_ptx) / sum(len(ptx[i]) - 1 for i in drawn)
                ptx_loss = lm_loss(policy, [ptx[i] for i in own_ptx], pad_id)
                loss = loss + config.ptx_coef * ptx_share * ptx_loss
                named["ptx_loss"] = ptx_share * ptx_loss.detach()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            world.sum_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            totals = world.sum(torch.stack(list(named.values())))
            for name, value in zip(named, totals.tolist(), strict=True):
                stats[name].append(value)
    rollout.refresh(policy)  # the next rollouts come from the updated adapter
    update_done = time.monotonic()

    # Adapt beta to the KL per response measured on this batch (no-op when it is fixed).
    sequence_kl = torch.where(mask.bool(), kl, 0.0).sum(dim=1).mean().item()
    kl_ctl.update(sequence_kl, n)

    # Metrics: rollout statistics, the means of the update statistics over all minibatches, timings.
    seconds = update_done - started
    return {
        "step": float(step),
        "reward_mean": scores.mean().item(),
        "reward_std": scores.std().item() if n > 1 else 0.0,
        "kl": sequence_kl,
        "kl_coef": kl_coef,
        "explained_variance": explained_variance(old_values, returns, mask).item(),
        "response_length": mask.sum(dim=1).float().mean().item(),
        "truncated": 1.0 - sum(finished) / n,  # share of answers cut at max_new_tokens
        **{name: sum(xs) / len(xs) for name, xs in stats.items()},
        "weights_on_rank": weights_on_rank(policy),  # below 1 with FSDP: the share of the weights held here
        "tokens_per_s": mask.sum().item() / seconds,
        "rollout_seconds": rollout_done - started,
        "scoring_seconds": scoring_done - rollout_done,
        "update_seconds": update_done - scoring_done,
        "seconds": seconds,
    }
