# A skip transcoder (topk, k 32) from mlp_in to mlp_out at SmolLM2-135M layer 15 trained 4x the budget of
# config/smollm2_l15_frontier.py (2,400 steps of 1,024: 4.7 passes over the cache), and with --acts=data/smollm2_l15_out --site=mlp_out
# --target_site= --skip=False an SAE
# on mlp_out the same way, whose features --mode=overlap compares (docs/results.md "transcoders").
# bash config/smollm2_experiments.sh transcoders runs both.
acts = "data/smollm2_l15_tc"
site = "mlp_in"
target_site = "mlp_out"
out_dir = "out/smollm2_l15_tc_long"
d_sae = 4608
batch_size = 1024
lr = 3e-3
max_iters = 2400
arch = "topk"
k = 32
skip = True
eval_interval = 1200
eval_tokens = 8192
resample_iters = ()
dead_window = 300_000
