"""refformer.refimpl.training: training the reference, around the math in refformer.refimpl (docs/DESIGN.md,
"Layout").

    data.py         corpora: the de-en dictionary and Python-documentation extraction, split files, readers
    tokenizer.py    the byte-level tokenizer (Hugging Face tokenizers): training, encode/decode, tokenizer.json
    batching.py     examples, padded length-bucketed batches under a token budget, the resumable batch order
    options.py      TrainOptions (how to train) and the number checks the training modules share
    checks.py       before any work: the output folder a run may write, the memory a model and batch need
    setup.py        a run set up from a data folder (prepare_training, evaluate_split): what the CLI calls
    loop.py         the training loop: train_step, train, TrainResult, TrainingDiverged, the output lock
    evaluate.py     loss, perplexity and greedy BLEU/chrF of a model on examples
    checkpoint.py   atomic checkpoints that resume exactly (safetensors + trainer_state.json)
    log.py          train_log.csv and loss.png
    interrupts.py   interrupts_deferred: Ctrl-C held back while files switch (checkpoints, generate's records)
"""
