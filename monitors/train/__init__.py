"""Training of monitors: token activations, logistic probes (Apollo recipe), SAEs (TopK / ReLU) and
top-activating examples per SAE feature. Pure torch; the CLI lives in service/cli_train.py and service/cli_sae.py."""
