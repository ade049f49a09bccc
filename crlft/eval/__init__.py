"""Evaluation without Ray: what shows that C-RLFT worked (the paper's evidence, section 5) and what a fine-tune kept.
`crlft eval` (jobs/evaluate.py) checks its inputs, runs these on a loaded model and records the figures in MLflow.

- answers.py: greedy answers of token-id prompts by a `Decoder` (the serving engine's), prompts fitted to the context
- scoring.py: a verifiable suite's items (eval.jsonl), reading them, exact-match and whole-word scoring
- suites.py: a verifiable suite answered under each condition, its metrics and the condition swap
- representation.py: held-out conversations embedded, how the conditions separate, a 2-D projection plotted
- mt_bench.py: MT-bench and Vicuna-bench answers graded 1-10; judge.py: the judge client and FastChat's judge prompts
- general_check.py: the general-capability check shipped with the package (its prompts and their scorer)
- retention.py: a fine-tune's general answers against its base model's (retention, agreement, the judged comparison)
- measure.py: every evaluation a plan asks for, run on a loaded model, its files written into the results folder,
  and the printed report; retention's plan and its base model's answers, measured once and cached
"""
