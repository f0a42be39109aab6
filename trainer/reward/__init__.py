"""The reward-model stage: scalar reward models (the policy's and the gate's judge) trained on the store's
feedback, each round continuing from the previous round's model on what is new plus a replay sample.
Its config, `RewardModelConfig`, is in reward_model.py beside the training code.
"""
