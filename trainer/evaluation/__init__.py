"""The evaluation stage: the gate a round's policy must pass before it is published, judged by a reward
model PPO never optimised, on prompts PPO never saw (gate.py, config `EvalConfig`), and the confidence
intervals of the accuracies and rates the stages report (intervals.py).
"""
