"""The jobs of `run_lib` / `main.py --mode`, one module each, over one builder.

    builder.py           config → device, workdir, seeds, data, SDE, network, loss, EMA, sampler settings;
                         checkpoint names; the torchrun context of a job
    generation.py        what samples are conditioned on (labels, guidance, the classifier), drawing them in
                         batches or in resumable scored rounds, sample pictures
    train.py             --mode train
    evaluate.py          --mode eval
    sample.py            --mode sample, with inpainting and colorization
    compare.py           --mode compare
    train_classifier.py  --mode train_classifier

Jobs orchestrate: the math lives in the rest of sde_diffusion.
"""
