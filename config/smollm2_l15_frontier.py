# Every architecture's sparsity frontier on SmolLM2-135M layer 15 mlp_in (L0 from about 10 to 150), the
# ReLU SAE with its L1 loss among them, all on the same batches of the walk-through's activation cache (one pass,
# 28 SAEs). Needs the cache of config/smollm2_l15.py. python sae.py config/smollm2_l15_frontier.py
acts = "data/smollm2_l15"
out_dir = "out/smollm2_l15_frontier"
d_sae = 4608                       # 8 x 576
batch_size = 1024
lr = 3e-3
max_iters = 600                    # 614,400 activations, 1.2 passes over the cache: a small-scale comparison
arch = ["relu", "topk", "batchtopk", "matryoshka", "fsq", "jumprelu", "vae"]
l1_coeff = [0.5, 1.0, 2.0, 4.0]    # relu: L1 of f_i |W_dec,i| (the default recipe)
k = [16, 32, 64, 128]              # topk, fsq: per token; batchtopk, matryoshka: per token on average
l0_coeff = [0.3, 1.0, 3.0, 10.0]   # jumprelu
kl_coeff = [0.3, 1.0, 3.0, 10.0]   # vae
sparsity_warmup_iters = 200              # the sparsity coefficient's ramp (relu, jumprelu, vae)
eval_interval = 600
eval_tokens = 8192                 # val contexts for FVU, CE and KL (three forwards of the model each)
resample_iters = ()
dead_window = 300_000              # tokens without a firing: half the run
