"""Class-conditional quickstart: the VP digits model of vp_digits.py with a label embedding (10 classes) and label
dropout 0.1, so that one network gives conditional and unconditional scores (classifier-free guidance).

    python main.py --config configs/vp_digits_cond.py --mode train
    python main.py --config configs/vp_digits_cond.py --mode sample --config.sampling.class_labels=per_class \\
        --config.sampling.guidance_scale=2
writes runs/vp_digits_cond/samples/checkpoint_1_pc_nfe<N>_per_class_w2.png, one row per digit 0..9.
"""
from configs.vp_digits import get_config as get_unconditional_config


def get_config():
    config = get_unconditional_config()
    config.model.num_classes = 10
    config.training.label_dropout = 0.1
    config.sampling.steps = 200  # per_class grids of 100 samples in well under a minute on 2 CPU cores
    config.eval.num_samples = 100  # --mode sample with class_labels=per_class: 10 per digit
    config.eval.batch_size = 100
    config.classifier.n_iters = 1500  # --mode train_classifier (classifier guidance), about 3 minutes on 1 CPU core
    return config
