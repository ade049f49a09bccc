"""The synthetic data `crlft synth` writes, each set saying why it is built as it is:

- suite.py: the mixed-quality suite that shows C-RLFT working on a tiny model in minutes on a CPU (tasks.py: its five
  tasks, each a rule over a few facts, with the systematic error the sub-optimal class makes);
- facts.py: a mixed-quality set of invented facts, for fine-tuning a pretrained model and showing what it forgets.

Both write their eval questions in the verifiable-suite format evaluation reads (crlft.eval.scoring).
"""
