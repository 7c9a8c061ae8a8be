# The JL penalty's welch form (docs/training.md "the JL penalty's forms"; mu the Welch bound (0.039); its per-row pull at random spread is about 1/29 of atanh's, so 3e3-3e5 sits where atanh's 1e2-1e4 did) in hybrid with
# the ReLU SAE's L1 at coefficient 3 (between the frontier's 2 and 4, which bracket L0 32) and with topk at k 32, three
# coefficients a decade apart from "no effect" to "dominates". The budget and evaluation of
# config/smollm2_l15_frontier.py and config/smollm2_l15_jl.py, whose plain relu, topk and atanh-hybrid SAEs are the
# baselines. Needs the cache of config/smollm2_l15.py. python sae.py config/smollm2_l15_jl_welch.py
acts = "data/smollm2_l15"
out_dir = "out/smollm2_l15_jl_welch"
d_sae = 4608
batch_size = 1024
lr = 3e-3
max_iters = 600
arch = ["relu", "topk"]
loss = "hybrid"
l1_coeff = 3.0
k = 32
jl_form = "welch"
jl_coeff = [3e3, 3e4, 3e5]
jl_decay_iters = 200              # as config/smollm2_l15_jl.py: the 10x start decays over the first third of the run
sparsity_warmup_iters = 200
eval_interval = 600
eval_tokens = 8192
resample_iters = ()
dead_window = 300_000
