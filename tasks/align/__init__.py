"""The align stage: SFT -> preference pairs -> reward model -> PPO -> evaluation.

Plain functions (no Prefect here) that the align flow calls with paths; see each module's docstring.
"""
