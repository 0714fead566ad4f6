"""From the command line and YAML to a run: composing the Hydra config (`compose`), the entry points' own keys
and help (`apps`, `help`), the members of a co-training run (`members`), checks of the composed config
(`validate`), building the data, model and trainer from it (`wiring`), and the sweep table (`sweep`)."""
