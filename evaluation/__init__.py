"""SiloTune evaluation: FlowerTune's four leaderboard suites, run locally and offline.

``silotune eval`` loads a base model (+ optional PEFT adapter), reads benchmark files from a data
directory (see docs/evaluation.md), generates greedily with FlowerTune's prompts, extracts answers
with FlowerTune's rules, runs generated code in a sandbox, and writes JSON plus a markdown table in
the leaderboard's shape.
"""
