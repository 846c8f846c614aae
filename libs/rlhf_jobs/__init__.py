"""Offline jobs, apart from the online services: reward-model training and SFT/DPO from files.

    python -m rlhf_jobs.reward_model ...   Bradley-Terry reward model on preference pairs
    python -m rlhf_jobs.offline sft|dpo|ipo ...   a policy from demonstrations or pairs

No service imports this package; it is installed with the `jobs` extra.
"""
