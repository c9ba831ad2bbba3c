"""The optimisation commands that train: one module per command, its recipe schema beside its run function
(registered with `pipelines.train.training_command`)."""
