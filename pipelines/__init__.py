"""The neodragon library: models, flow engine, data, evaluation, training."""
