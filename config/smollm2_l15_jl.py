# Does the JL penalty move the ReLU SAE's frontier? The hybrid loss (L1 + JL) over the L1 coefficients of
# config/smollm2_l15_frontier.py, crossed with JL coefficients a decade apart, and JL alone (no sparsity term), on
# the same batches (same seed, batch size and cache) and the same 600 steps, so the frontier's relu-l1 SAEs are
# the no-JL baseline. The exact penalty (jl_sample = 0): the sampled estimate does not train like it (docs/results.md).
# Needs the cache of config/smollm2_l15.py. python sae.py config/smollm2_l15_jl.py
acts = "data/smollm2_l15"
out_dir = "out/smollm2_l15_jl"
d_sae = 4608
batch_size = 1024
lr = 3e-3
max_iters = 600
loss = ["hybrid", "jl"]
l1_coeff = [0.5, 1.0, 2.0, 4.0]
jl_coeff = [1e2, 1e3, 1e4]
jl_decay_iters = 200              # the 10x start decays over the first third of the run (2,000 steps at full scale)
sparsity_warmup_iters = 200
eval_interval = 600
eval_tokens = 8192
resample_iters = ()
dead_window = 300_000
