"""The OpenChat paper's ablation at laptop scale, its Ray-free parts: what is trained (variants.py: the variants,
their data and run configurations, the step budget), how the runs are summarized and judged (summary.py: mean and
spread, the paper's claims under the win rule, the table) and drawn (plots.py), and what of it is finished (ledger.py:
a stopped ablation goes on where it stopped). jobs/ablation.py runs it on Ray (`crlft ablation`).

On the synthetic mixed-quality suite (crlft/synth/suite.py) the tiny default model is trained once per variant and seed,
every run with the same seed, number of optimiser steps and learning-rate schedule, and scored on the held-out split:

    variant           template          loss weights        data                     paper (Table 2)
    crlft             condition         GPT4 1.0, GPT3 0.1  all                      77.3
    conditioned       condition         all 1.0             all                      74.0
    weighted          no condition      GPT4 1.0, GPT3 0.1  all                      60.5
    sft               no condition      all 1.0             all                      52.7
    expert_only       no condition      all 1.0             GPT4 conversations only  64.5
    suboptimal_only   no condition      all 1.0             GPT3 conversations only  42.8

Reported per variant (mean and spread over the seeds): exact-match accuracy on the held-out questions under the
expert condition and under the sub-optimal one (the same prompt for variants without a condition), the silhouette
score of expert vs sub-optimal held-out conversations in the model's last hidden states, and the training time.
A difference counts as a win only when it is larger than the two spreads added (spread = standard deviation over the
seeds); the claims the paper makes are checked with that rule and printed under the table.

A real base model: does fine-tuning keep what it knew, and does replay help?
----------------------------------------------------------------------------
With `--base-model` the runs start from a real pretrained chat model instead (recipe lora_synth.yaml: LoRA, the LoRA
default learning rate), every seed from the same weights (the seed draws the adapters and the data order), by default
the variants crlft, conditioned and sft (REAL_MODEL_VARIANTS), and the ablation answers issue #25's question:

- **Replay** (`--replay`, default `both` for a real base model): every variant is trained without replay
  (`data.replay.enabled: false`, row `crlft`) and with it (`true`, row `crlft+replay`: the base model's own greedy
  answers to general prompts mixed into the training data, crlft/data/replay.py). `on` or `off` trains one of the two.
  The data is built once per template and replay (4 builds for the default variants); the base model answers the
  replay prompts once per template (the answers are cached in the state folder by fingerprint, which names the
  template), and every run trains the same number of steps, so a replay run sees fewer synthetic conversations.
  A name with the suffix in `--variants` (`sft+replay`) is trained as named, whatever `--replay` says.
- **Retention** (crlft/eval/retention.py): every run's general accuracy on the shipped general check
  (crlft/assets/general/check.jsonl: 398 prompts of facts, arithmetic, word knowledge and instructions, scored right or
  wrong) divided by the base model's, each asked as it is served (the base through its own chat template); 1.0 means
  the fine-tune kept every right answer. Beside it `agreement`, the ROUGE-L of the run's answers to open prompts
  against the base's (drift; what replay should buy). The base is measured once (before the first run, cached in
  `<state_dir>/retention/`, shared with `crlft eval`), and its general accuracy is printed under the table with its
  accuracy on the suite before any fine-tuning.
- The claims add, per variant trained both ways, whether replay retains more and whether it keeps the accuracy.
- The tiny default model is not pretrained: it knows nothing to keep, so there is no replay (`--replay off`, the
  default; on is an error) and no retention column; its table is the one in benchmarks/RESULTS.md.

`--facts` trains on crlft/synth/facts.py's mixed-quality set of invented facts (answers in sentences, scored by whole
words; no held-out conversations, so no silhouette) instead of the synthetic suite: new knowledge that no base model
has, the case where forgetting matters.

Cost (RESULTS.md, 2 idle cores): a SmolLM2-135M run (80 LoRA steps) trains in 144-185 s (about 1.9 s a step
without replay, 2.2 with its distillation term) and is evaluated with retention (398 check prompts, 40 open ones) in
about 2 minutes more. The defaults (3 variants x replay on/off x 3 seeds) are 18 runs one at a time: 82 minutes with
the base model's answers and two replay generations (about 2 minutes each); busy cores take 2-3x. `--seeds 0`,
`--replay on` or `--retention-limit 100 --open-limit 0` cut it; a stopped ablation goes on with the same --out.

Why the suite and the budget look the way they do
-------------------------------------------------
- The suite (crlft/synth/suite.py explains it) was cut to 59 facts, 600 expert and 2400 sub-optimal conversations,
  90% of GPT3's answers systematically wrong, after the first one (127 facts, 10x sub-optimal data, 75% wrong) needed
  ~14 minutes of training for 0.68 expert accuracy. The mixture's majority answer is wrong for every question, so SFT
  learns GPT3's errors; only a model that tells the classes apart can answer right.
- The budget is the recipe's (8 epochs over the mixture: 968 steps of one 512-token bin, ~28 conversations) for every
  variant. Half of it is not enough: at 500 steps C-RLFT (seed 0) was at 0.50 under GPT4 and 0.38 under GPT3, the
  classes not yet apart; at 968 steps it is at 0.87 and 0.05.
- Every variant gets the same number of steps, so `expert_only` passes over its 600 conversations five times as often
  as the others over the mixture. On this suite GPT3's data teaches nothing GPT4's lacks, so `expert_only` is the
  reference that shows the suite is learnable (the issue's "the effect is the method's, not the suite's"), not a
  competitor: in the paper GPT-3.5's data adds breadth and expert-only SFT loses to C-RLFT. The claims compare crlft
  with the other modes trained on the same mixture.
- Runs are independent and trained `--parallel` at a time (default: cores / cores per training worker, 2 here), in
  one Ray session. A run's result does not depend on what runs beside it: crlft and sft for seed 0 gave the same
  accuracies and silhouettes one after the other and side by side.
"""
