# Transcoders on SmolLM2-135M layer 15, mlp_in -> mlp_out (the MLP replaced), plain and with the skip path,
# relu (L1) and topk over three sparsities each; with --acts=data/smollm2_l15_out --site=mlp_out --target_site=
# --skip=False, the same SAEs on mlp_out itself, the baseline a transcoder is compared with; with the layer-5 caches
# (--acts, --out_dir), layer 5.
# The budget of config/smollm2_l15_frontier.py. `bash config/smollm2_experiments.sh transcoders` makes the
# caches and runs them all.
acts = "data/smollm2_l15_tc"
site = "mlp_in"
target_site = "mlp_out"
out_dir = "out/smollm2_l15_tc"
d_sae = 4608                       # 8 x 576
batch_size = 1024
lr = 3e-3
max_iters = 600
arch = ["relu", "topk"]
skip = [False, True]
l1_coeff = [1.0, 2.0, 4.0]
k = [16, 32, 64]
sparsity_warmup_iters = 200
eval_interval = 600
eval_tokens = 8192
resample_iters = ()
dead_window = 300_000
