"""Fine-tuning: ``recipe.train(TrainSpec, TrainHooks) -> TrainResult``, run on claimed jobs by ``worker.Worker``.

Import the parts you need (``tunelab.training.recipe`` loads torch; ``hparams`` and ``hooks`` do not).
"""
