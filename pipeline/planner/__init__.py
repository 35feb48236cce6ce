"""The planner (issue 27): the best model that fits a weight budget, from per-layer choices.

- `options`: what one decoder layer may become ("skip", or an N:M pattern x bits pair, "2:4/4").
- `sensitivity`: the change in log-perplexity when only one layer takes one option, measured on
  calibration windows from cached layer inputs, cached on disk per model (`SensitivityTable`).
- `layer_edit`: WANDA N:M and RTN/GPTQ quantization of one layer, in the GPTQ stage's format.
- `search`, `budget`: the multiple-choice knapsack over those tables (written by the search part).

Nothing is imported here, so `import frankenlab.pipeline.planner.options` stays light.
"""
