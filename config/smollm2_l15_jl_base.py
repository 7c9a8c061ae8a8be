# The baselines of config/smollm2_l15_jl_power.py and config/smollm2_l15_jl_welch.py (plain L1 at
# coefficient 3, topk at k 32), trained here so that --mode=overlap reads their checkpoints too; the
# same settings and batches as config/smollm2_l15_frontier.py (whose topk-k32 differs slightly from this one: the
# code changed since, e.g. the bf16 kernel operands; FVU 0.322 both, CE recovered 0.676 there, 0.662 here). Needs the cache of
# config/smollm2_l15.py. python sae.py config/smollm2_l15_jl_base.py
acts = "data/smollm2_l15"
out_dir = "out/smollm2_l15_jl_base"
d_sae = 4608
batch_size = 1024
lr = 3e-3
max_iters = 600
arch = ["relu", "topk"]
loss = "sparsity"
l1_coeff = 3.0
k = 32
sparsity_warmup_iters = 200
eval_interval = 600
eval_tokens = 8192
resample_iters = ()
dead_window = 300_000
