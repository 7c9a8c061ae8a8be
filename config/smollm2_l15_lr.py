# Decoupled learning rates, the decoder's at 3x and 10x the encoder's (3e-3), for the ReLU SAE with l1 and
# with hybrid (JL 1e3), at L1 coefficient 2; the 1x points are the same SAEs in config/smollm2_l15_frontier.py
# and config/smollm2_l15_jl.py (same seed, batches and steps). Needs the cache of config/smollm2_l15.py.
# python sae.py config/smollm2_l15_lr.py
acts = "data/smollm2_l15"
out_dir = "out/smollm2_l15_lr"
d_sae = 4608
batch_size = 1024
lr = 3e-3                          # the encoder's (lr_enc = 0 means lr)
lr_dec = [9e-3, 3e-2]
loss = ["sparsity", "hybrid"]
l1_coeff = 2.0
jl_coeff = 1e3
jl_decay_iters = 200
max_iters = 600
sparsity_warmup_iters = 200
eval_interval = 600
eval_tokens = 8192
resample_iters = ()
dead_window = 300_000
