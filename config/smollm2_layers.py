# Every fifth layer of SmolLM2-135M (0, 5, 10, 15, 20, 25 and the last, 29), mlp_in, one setting per
# method: the ReLU SAE with l1 (and, in a second command, hybrid with JL 1e3) at L1 coefficient 2, the k-sparse
# ones at k 32, jumprelu at L0 coefficient 3, vae at KL coefficient 0.3 (the settings nearest L0 32-64 on layer
# 15's frontier); the same 600 steps, batches and evaluation as config/smollm2_l15_frontier.py. Per layer L, a cache
# of the same size as layer 15's, then the two commands:
#   python sae.py --mode=cache --init_from=models/smollm2-135m --data_dir=data/smollm2 --layer=$L --site=mlp_in \
#       --cache_dir=data/smollm2_l$L --cache_tokens=524288 --eval_tokens=8192 --dtype=float32
#   python sae.py config/smollm2_layers.py --acts=data/smollm2_l$L --out_dir=out/smollm2_layers/l$L
#   python sae.py config/smollm2_layers.py --acts=data/smollm2_l$L --out_dir=out/smollm2_layers/l$L-hybrid \
#       --arch=relu --loss=hybrid
# (bash config/smollm2_experiments.sh layers runs them all); its plot part draws figures/smollm2_layers/layers.png.
d_sae = 4608
batch_size = 1024
lr = 3e-3
max_iters = 600
arch = ["relu", "topk", "batchtopk", "matryoshka", "fsq", "jumprelu", "vae"]
l1_coeff = 2.0
k = 32
l0_coeff = 3.0
kl_coeff = 0.3
jl_coeff = 1e3
jl_decay_iters = 200
sparsity_warmup_iters = 200
eval_interval = 600
eval_tokens = 8192
resample_iters = ()
dead_window = 300_000
